//! Way (b) of the machine-memory budget, `--machine-mem SIZE --pager uffd` (`vmm::budget::uffd`):
//! bad arguments are one line with the documented exit code; several VMs under one budget
//! smaller than their working sets finish with the same results as without it (checksums and
//! the guest's own first-touch counts, known from the specs), show the pager's swap-ins as the
//! vCPU threads' host major faults, and never hold more guest memory than the budget: measured
//! independently of the pager by the kernel, as the shmem pages charged to a memory cgroup
//! (without a limit) that the test puts the `vmm` in. The pager's swap file is gone afterwards.
//! Needs root, userfaultfd and a cgroup v1 memory controller: skips with a reason without them,
//! fails under CI=1.
mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{
    assert_one_line_error, kvm_available, read_json, run_vmm, sigterm, spawn_vmm, temp_file, text,
    wait_watching,
};

const DEADLINE: Duration = Duration::from_secs(180);
/// One paged vmm at a time: they share the CPU and the disk.
static SERIAL: Mutex<()> = Mutex::new(());
/// Each VM: a data set of 8 MiB updated at random (the VMM writes it before the guest runs),
/// and 8 MiB of fresh memory, both 2,048 pages, 20,000 accesses each.
const UPDATE: &str = "update 8 R 5000 4";
const WORK: &str = "work 8 R 5000 4";
const PAGES_PER_TASK: u64 = 2048;
const MEMCG: &str = "/sys/fs/cgroup/memory";

fn paging_possible(test: &str) -> bool {
    let memcg = Path::new(MEMCG).join("memory.stat").exists();
    common::root_and(test, "a cgroup v1 memory controller", memcg)
}

/// (checksum, guest minor faults, host major faults) of every task of every VM.
fn task_results(s: &serde_json::Value) -> Vec<(serde_json::Value, u64, u64)> {
    s["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .flat_map(|vm| vm["tasks"].as_array().expect("tasks").clone())
        .map(|t| {
            (
                t["checksum"].clone(),
                t["guest_min_flt"].as_u64().unwrap_or(0),
                t["host"]["host_maj_flt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn bad_pager_arguments_are_one_line_with_their_exit_code() {
    let existing = temp_file("budget-uffd", "taken.swap", b"x");
    let existing = existing.to_str().expect("path");
    // An 8 MiB budget for a VM that does not fit it, paging to `swap`.
    let with_swap = |swap| {
        vec![
            "--machine-mem",
            "8M",
            "--pager",
            "uffd",
            "--swap",
            swap,
            "--workload",
            WORK,
        ]
    };
    let cases: Vec<(Vec<&str>, i32, Vec<&str>)> = vec![
        (vec!["--pager", "uffd"], 2, vec!["--machine-mem"]),
        (
            vec!["--machine-mem", "64M", "--pager", "lru"],
            2,
            vec!["lru"],
        ),
        (
            vec!["--machine-mem", "2M", "--pager", "uffd"],
            13,
            vec!["too small", "2 MiB"],
        ),
        (
            vec!["--machine-mem", "64M", "--pager", "uffd", "--vms", "2"],
            13,
            vec!["template", "--share none"],
        ),
        (
            vec!["--machine-mem", "64M", "--pager", "uffd", "--ksm"],
            13,
            vec!["--ksm"],
        ),
        (with_swap("none"), 13, vec!["--swap none", "do not fit"]),
    ];
    let mut cases = cases;
    if common::is_root() && kvm_available("bad_pager_arguments_are_one_line_with_their_exit_code") {
        // A swap file that exists is never reused or overwritten (O_EXCL).
        cases.push((with_swap(existing), 13, vec![existing, "exists"]));
    }
    for (args, code, words) in cases {
        assert_one_line_error(&args, code, &words);
    }
    assert_eq!(std::fs::read(existing).expect("still there"), b"x");
}

/// A memory cgroup without a limit, removed on drop: the kernel's count of what its
/// processes hold.
struct Meter(PathBuf);

impl Meter {
    fn new() -> Self {
        let dir = Path::new(MEMCG).join(format!("mirrorball-test-uffd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test cgroup");
        Self(dir)
    }

    /// Shmem pages charged now, bytes (memfd guest memory and the run directory's files).
    fn shmem(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.0.join("memory.stat")).ok()?;
        let line = text.lines().find(|l| l.starts_with("shmem "))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Bytes of tmpfs the files in `dir` take (the profiler regions).
fn allocated_in(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn vms_under_pressure_finish_correctly_within_the_budget() {
    if !paging_possible("vms_under_pressure_finish_correctly_within_the_budget") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let common_args = [
        "--vms",
        "2",
        "--share",
        "none",
        "--workload",
        UPDATE,
        "--workload",
        WORK,
    ];
    let free = temp_file("budget-uffd", "free.json", b"");
    let mut args = common_args.to_vec();
    args.extend(["--stats", free.to_str().expect("path")]);
    let out = run_vmm(&args, DEADLINE);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let reference = task_results(&read_json(&free));
    assert_eq!(reference.len(), 4);

    // 8 MiB for two VMs whose tasks touch 4 x 8 MiB (and whose images hold more).
    let budget: u64 = 8 << 20;
    let capped = temp_file("budget-uffd", "capped.json", b"");
    let run_dir = Path::new("/dev/shm").join(format!("mb-test-uffd-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let meter = Meter::new();
    let procs = meter.0.join("cgroup.procs");
    let mut command = Command::new(common::vmm_bin());
    command
        .args(common_args)
        .args(["--machine-mem", "8M", "--pager", "uffd"])
        .args(["--stats", capped.to_str().expect("path")])
        .arg("--run-dir")
        .arg(&run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let procs_c = std::ffi::CString::new(procs.to_str().expect("path")).expect("path");
    // SAFETY: the hook runs in the child between fork and exec and only makes async-signal-safe
    // calls (open, write, close) on memory prepared before the fork: it joins the test cgroup
    // ("0" is the writing process) so every page the vmm allocates is charged there.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0\n".as_ptr().cast(), 2);
            libc::close(fd);
            if n != 2 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("vmm");
    let pid = child.id();
    let swap_file = PathBuf::from(format!("/var/tmp/mirrorball-uffd-swap-{pid}"));
    let (mut samples, mut highest, mut saw_swap) = (0, 0u64, false);
    let (status, stderr) = wait_watching(&mut child, DEADLINE, "paged run", || {
        if let Some(shmem) = meter.shmem() {
            let regions = allocated_in(&run_dir);
            samples += 1;
            highest = highest.max(shmem.saturating_sub(regions));
        }
        if let Ok(m) = std::fs::metadata(&swap_file) {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "swap file mode");
            saw_swap = true;
        }
    });
    let _ = std::fs::remove_dir_all(&run_dir);
    assert_eq!(status.code(), Some(0), "{status:?}: {stderr}");
    let s = read_json(&capped);
    let results = task_results(&s);
    for ((sum, minflt, majflt), (want_sum, _, _)) in results.iter().zip(&reference) {
        assert_eq!(sum, want_sum, "same result as without a budget");
        assert_eq!(*minflt, PAGES_PER_TASK, "the guest's first touches");
        assert!(*majflt > 100, "swap-ins charged to every task: {results:?}");
    }
    let m = &s["machine_memory"];
    assert_eq!(m["pager"], "uffd");
    assert_eq!(m["budget_bytes"].as_u64(), Some(budget));
    let swap_ins = m["counts"]["swap_ins"].as_u64().expect("swap_ins");
    let charged: u64 = results.iter().map(|r| r.2).sum();
    // The vCPUs take nearly all of them; the rest are the VMM's own reads of guest memory
    // (task results, the guest's page bitmaps) and a vCPU's time outside any task.
    assert!(
        charged <= swap_ins + 200 && charged * 100 >= swap_ins * 99,
        "swap-ins are the tasks' major faults: {charged} vs {swap_ins}"
    );
    let peak = m["peak_bytes"].as_u64().expect("peak");
    assert_eq!(peak, budget, "the pager filled the budget and held it");
    assert!(samples > 10, "the cgroup was sampled ({samples})");
    assert!(
        highest <= budget,
        "resident guest memory {highest} > budget {budget} (kernel's shmem count)"
    );
    assert!(highest > budget / 2, "the meter saw the guests: {highest}");
    assert!(saw_swap, "the swap file existed while the VMs ran");
    assert!(!swap_file.exists(), "the swap file is removed at the end");
}

#[test]
fn sigterm_ends_the_vms_and_removes_the_swap_file() {
    if !paging_possible("sigterm_ends_the_vms_and_removes_the_swap_file") {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = spawn_vmm(&[
        "--workload",
        "work 16 R 50000000",
        "--machine-mem",
        "8M",
        "--pager",
        "uffd",
    ]);
    let pid = child.id();
    let swap_file = PathBuf::from(format!("/var/tmp/mirrorball-uffd-swap-{pid}"));
    let start = Instant::now();
    while !swap_file.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(swap_file.exists(), "the pager's swap file appears");
    // Let it page for a moment, then end it.
    std::thread::sleep(Duration::from_secs(2));
    sigterm(&child);
    let (status, _) = wait_watching(&mut child, Duration::from_secs(30), "SIGTERM", || {});
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(!swap_file.exists(), "the swap file is removed on SIGTERM");
}

/// A small tmpfs mounted for one test, unmounted (and its mount point removed) on drop.
struct SmallMount(PathBuf);

impl SmallMount {
    fn new(size: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("mb-test-small-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!("mount failed: {}", text(&out.stderr)));
        }
        Ok(Self(dir))
    }
}

impl Drop for SmallMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The pager reserves all the swap its VMs can need up front, so its swap cannot fill while
/// they run (that path is tested in `vmm::budget::uffd`'s unit tests); a swap directory without
/// that room (and the 512 MiB kept free) is refused before any VM starts: one line, exit code 13,
/// and no file left there.
#[test]
fn a_swap_directory_without_room_is_one_line_with_exit_code_13() {
    let test = "a_swap_directory_without_room_is_one_line_with_exit_code_13";
    if !common::is_root() {
        return common::skip_or_fail(test, "needs root to mount a small tmpfs");
    }
    let small = match SmallMount::new("4M") {
        Ok(mount) => mount,
        Err(why) => return common::skip_or_fail(test, &why),
    };
    let swap = small.0.join("pager.swap");
    assert_one_line_error(
        &[
            "--machine-mem",
            "8M",
            "--pager",
            "uffd",
            "--swap",
            swap.to_str().expect("path"),
            "--workload",
            WORK,
        ],
        13,
        &["no space for a swap file", "MiB free"],
    );
    assert!(!swap.exists(), "no swap file is left behind");
}
