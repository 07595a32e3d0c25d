//! Many VMs in one process, cloned copy-on-write from one template: what each VM shares and
//! copies is exact (the OS-less guest's streams are deterministic, so the host replays them), a
//! write in one VM is never seen by another or by the template, fresh pages start zeroed, a
//! private page starts as a copy of the template's, a VM's exit returns its private pages, one
//! VM's crash leaves the others' results intact, an interrupt ends them all, and bad fleets are
//! refused before anything starts.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{kvm_available, reference_linux, run_vmm, skip_or_fail, text, tiny_elf};
use mirrorball_workload::{AccessStream, Pattern, TaskParams, PAGE_BYTES};
use serde_json::Value;
use vmm::builder::{self, ConsoleSink, GuestConfig, MemorySource, VmResources, WorkloadConfig};
use vmm::host::HostContext;
use vmm::workload::{data_set_byte, layout, TaskMode, TaskSpec};

const DEADLINE: Duration = Duration::from_secs(180);

/// What a task of `spec` (laid out as `t`) reads over its whole run, replayed on the host: its
/// distinct pages and the low 24 bits of its checksum. Its region starts as its data set
/// (`read`, `update`) or zeroed (`work`).
fn replay(spec: &TaskSpec, t: &TaskParams) -> (u64, u32) {
    let pattern = Pattern::from_raw(t.pattern).expect("pattern");
    let mut memory: Vec<u8> = (0..t.region_bytes)
        .map(|o| {
            if spec.mode.has_data_set() {
                data_set_byte(t.seed, o)
            } else {
                0
            }
        })
        .collect();
    let writes = spec.mode != TaskMode::Read;
    let mut stream = AccessStream::new(pattern, t.region_bytes, t.seed);
    let mut pages = BTreeSet::new();
    let mut sum = 0u64;
    for _ in 0..t.accesses_per_iteration * u64::from(t.iterations) {
        let offset = stream.next_offset() % t.region_bytes;
        pages.insert(offset / PAGE_BYTES);
        let byte = &mut memory[usize::try_from(offset).expect("fits")];
        sum = sum.wrapping_add(u64::from(*byte));
        if writes {
            *byte = byte.wrapping_add(1);
        }
    }
    (pages.len() as u64, (sum & 0xff_ffff) as u32)
}

fn stats(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("stats file")).expect("stats json")
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mirrorball-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The three kinds of task, on one vCPU: reads of a data set, updates of a data set, and the
/// classic `work` over fresh memory.
const SPECS: [&str; 3] = ["read 8 R 3000 3", "update 4 L 4000 3", "work 4 R 1500 3"];

#[test]
fn clones_share_what_they_read_and_copy_what_they_write() {
    if !kvm_available("clones_share_what_they_read_and_copy_what_they_write") {
        return;
    }
    let specs: Vec<TaskSpec> = SPECS.iter().map(|s| s.parse().expect("spec")).collect();
    let plan = layout(&specs, 1).expect("layout");
    let expected: Vec<(u64, u32)> = specs
        .iter()
        .zip(&plan.tasks)
        .map(|(s, t)| replay(s, t))
        .collect();
    for share in ["template", "none"] {
        let dir = scratch(&format!("fleet-share-{share}"));
        let stats_path = dir.join("stats.json");
        let mut args = vec!["--vms", "3", "--share", share, "--vcpus", "1"];
        for s in SPECS {
            args.extend(["--workload", s]);
        }
        let run_dir = dir.join("run");
        args.extend([
            "--stats",
            stats_path.to_str().expect("utf-8"),
            "--run-dir",
            run_dir.to_str().expect("utf-8"),
        ]);
        let out = run_vmm(&args, DEADLINE);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        let json = stats(&stats_path);
        let vms = json["vms"].as_array().expect("a report per VM");
        assert_eq!(vms.len(), 3);
        for (i, vm) in vms.iter().enumerate() {
            assert_eq!(vm["name"], format!("vm{i}"));
            assert_eq!(vm["memory"]["cloned"], share == "template", "{vm}");
            for (t, (pages, checksum)) in expected.iter().enumerate() {
                let task = &vm["tasks"][t];
                let mem = &task["memory"]["pages"];
                let (shared, private) = (mem["shared"].as_u64(), mem["private"].as_u64());
                assert_eq!(task["finished"], true, "{task}");
                assert_eq!(
                    task["checksum"].as_u64(),
                    Some(u64::from(*checksum)),
                    "{share} vm{i} task {t}: every clone reads what the host replay reads"
                );
                let (shared, private) = (shared.unwrap_or(0), private.unwrap_or(0));
                // The breaks the sampler charged to the task in the host ring (what `vmm top`,
                // `record` and `prometheus` show) are exactly the scan's for its region.
                assert_eq!(
                    task["host"]["cow_breaks"].as_u64(),
                    Some(private),
                    "{share} vm{i} task {t}: {task}"
                );
                let region = if t == 0 { 2048 } else { 1024 };
                match (share, t) {
                    // A reader maps the template's pages and copies none: those it touched and
                    // those the host's fault-around mapped beside them.
                    ("template", 0) => {
                        assert_eq!(private, 0, "{task}");
                        assert!(*pages <= shared && shared <= region, "{pages} {task}");
                    }
                    // A writer owns exactly the pages it wrote; fault-around may map more of
                    // the template's beside them.
                    ("template", _) => {
                        assert_eq!(private, *pages, "{task}");
                        assert!(shared + private <= region, "{task}");
                    }
                    // Memory of its own is private, touched or mapped beside.
                    _ => {
                        assert_eq!(shared, 0, "{task}");
                        assert!(*pages <= private && private <= region, "{pages} {task}");
                    }
                }
            }
        }
        assert!(files_in(&run_dir).is_empty(), "{:?}", files_in(&run_dir));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Builds `config` cloned from `shared` and runs it to its end in this process; returns its
/// report and the process's anonymous memory while the VM still existed (at its end).
fn run_clone(
    config: &GuestConfig,
    shared: &Arc<builder::SharedImage>,
    host: &Arc<HostContext>,
    name: &str,
) -> (vmm::report::RunReport, u64) {
    let built = builder::build(
        config,
        VmResources {
            name: name.into(),
            memory: MemorySource::Template(shared.clone()),
            console: ConsoleSink::Null,
            host: host.clone(),
        },
    )
    .expect("build");
    let anon_at_end = Mutex::new(0);
    let keep = |_| *anon_at_end.lock().expect("lock") = rss_anon();
    let report = common::run_in_process(built, Duration::from_secs(120), Some(&keep));
    let anon = *anon_at_end.lock().expect("lock");
    (report, anon)
}

/// RssAnon of this process, bytes.
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

#[test]
fn a_writer_changes_neither_the_template_nor_a_later_clone_and_returns_its_pages() {
    if !kvm_available("a_writer_changes_neither_the_template_nor_a_later_clone") {
        return;
    }
    let dir = scratch("fleet-isolation");
    let host = Arc::new(HostContext::new(&dir, false).expect("kvm"));
    // One 32 MiB data set: the writer updates every page of it, the reader reads it.
    let config = |verb: &str| {
        GuestConfig::Workload(WorkloadConfig {
            specs: vec![format!("{verb} 32 L 200000 2").parse().expect("spec")],
            vcpus: 1,
            mem_bytes: None,
            profile_period: Some(Duration::from_millis(50)),
        })
    };
    let (writer, reader) = (config("update"), config("read"));
    let shared = Arc::new(builder::prepare_shared_image(&writer, &host).expect("template"));
    let template_bytes = |offset: u64, len: usize| {
        use std::os::unix::fs::FileExt;
        let base = match &shared.image {
            builder::Image::Workload(w) => w.plan.tasks[0].region_gpa,
            builder::Image::Linux(_) => unreachable!("a workload template"),
        };
        let mut buf = vec![0u8; len];
        shared
            .template
            .file()
            .read_exact_at(&mut buf, base + offset)
            .expect("template read");
        buf
    };
    let before = template_bytes(0, 1 << 20);
    let anon_before = rss_anon();
    let (w, anon_during) = run_clone(&writer, &shared, &host, "writer");
    let anon_after = rss_anon();
    let wrote = w.tasks[0].memory.as_ref().expect("memory").pages.private;
    assert_eq!(template_bytes(0, 1 << 20), before, "the template is sealed");
    let params = match &shared.image {
        builder::Image::Workload(w) => w.plan.tasks[0],
        builder::Image::Linux(_) => unreachable!("a workload template"),
    };
    assert!(
        before
            .iter()
            .enumerate()
            .all(|(o, &b)| b == data_set_byte(params.seed, o as u64)),
        "the template holds the data set"
    );
    // The writer's copies started as the template's pages: its checksum is the replay over the
    // data set with its own updates.
    let spec: TaskSpec = "update 32 L 200000 2".parse().expect("spec");
    let (touched, checksum) = replay(&spec, &params);
    assert_eq!(wrote, touched, "the writer owns exactly the pages it wrote");
    assert_eq!(
        w.tasks[0].progress.checksum, checksum,
        "private copies start as the template's pages"
    );
    let (r, _) = run_clone(&reader, &shared, &host, "reader");
    let spec: TaskSpec = "read 32 L 200000 2".parse().expect("spec");
    assert_eq!(
        r.tasks[0].progress.checksum,
        replay(&spec, &params).1,
        "a later clone reads the pristine data set"
    );
    assert_eq!(r.tasks[0].memory.as_ref().expect("memory").pages.private, 0);
    // The writer's copies are anonymous memory of this process while it runs, and go back to
    // the host when it ends (other tests of this file run beside it: compare with slack).
    let private_bytes = wrote * PAGE_BYTES;
    assert!(
        anon_during + (8 << 20) >= anon_before + private_bytes,
        "RssAnon {anon_before} → {anon_during} while {private_bytes} bytes were private"
    );
    assert!(
        anon_after + private_bytes * 3 / 4 <= anon_during,
        "RssAnon {anon_during} at the end → {anon_after} after the VM"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_crashed_vm_leaves_the_others_intact() {
    if !kvm_available("a_crashed_vm_leaves_the_others_intact") {
        return;
    }
    let dir = scratch("fleet-crash");
    // ud2 with an empty IDT: a triple fault.
    let crash = dir.join("crash.elf");
    std::fs::write(&crash, tiny_elf(&[0x0f, 0x0b])).expect("elf");
    let fleet = dir.join("fleet.toml");
    let workload = r#"workload = ["read 8 R 3000 3", "update 4 L 4000 3", "work 4 R 1500 3"]
vcpus = 1"#;
    std::fs::write(
        &fleet,
        format!(
            "[[vm]]\nname = \"a\"\n{workload}\n\n[[vm]]\nname = \"crash\"\nkernel = \"crash.elf\"\n\
             memory = \"64M\"\nshare = \"none\"\nsample_hz = 0\n\n[[vm]]\nname = \"b\"\n{workload}\n"
        ),
    )
    .expect("fleet file");
    let stats_path = dir.join("stats.json");
    let log_dir = dir.join("logs");
    let run_dir = dir.join("run");
    let out = run_vmm(
        &[
            "fleet",
            fleet.to_str().expect("utf-8"),
            "--stats",
            stats_path.to_str().expect("utf-8"),
            "--log-dir",
            log_dir.to_str().expect("utf-8"),
            "--run-dir",
            run_dir.to_str().expect("utf-8"),
        ],
        DEADLINE,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "the crash's own code: {stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
    let json = stats(&stats_path);
    let specs: Vec<TaskSpec> = SPECS.iter().map(|s| s.parse().expect("spec")).collect();
    let plan = layout(&specs, 1).expect("layout");
    for vm in json["vms"].as_array().expect("vms") {
        if vm["name"] == "crash" {
            assert_eq!(vm["end"]["kind"], "triple_fault");
            continue;
        }
        assert_eq!(vm["end"]["kind"], "workload_finished", "{vm}");
        for (t, (spec, params)) in specs.iter().zip(&plan.tasks).enumerate() {
            assert_eq!(
                vm["tasks"][t]["checksum"].as_u64(),
                Some(u64::from(replay(spec, params).1)),
                "{} task {t}",
                vm["name"]
            );
        }
    }
    assert!(files_in(&run_dir).is_empty(), "{:?}", files_in(&run_dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupt_ends_every_vm_and_leaves_no_file() {
    if !kvm_available("an_interrupt_ends_every_vm_and_leaves_no_file") {
        return;
    }
    let dir = scratch("fleet-interrupt");
    let run_dir = dir.join("run");
    let child = std::process::Command::new(common::vmm_bin())
        .args([
            "--vms",
            "4",
            "--workload",
            "work 16 R 100000 100000",
            "--run-dir",
            run_dir.to_str().expect("utf-8"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while files_in(&run_dir)
        .iter()
        .filter(|f| f.ends_with(".host"))
        .count()
        < 4
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the VMs never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid fits"), libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_eq!(stderr.matches("interrupted").count(), 4, "{stderr}");
    assert!(files_in(&run_dir).is_empty(), "{:?}", files_in(&run_dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_fleets_are_refused_before_anything_starts() {
    if !kvm_available("bad_fleets_are_refused_before_anything_starts") {
        return;
    }
    let dir = scratch("fleet-bad");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p.to_str().expect("utf-8").to_string()
    };
    let vm = |name: &str, extra: &str| {
        format!("[[vm]]\nname = \"{name}\"\nworkload = [\"work 4 R 10\"]\n{extra}\n")
    };
    let missing = dir.join("nope.toml").to_str().expect("utf-8").to_string();
    let malformed = write("malformed.toml", "[[vm]\nname=");
    let unknown = write("unknown.toml", &vm("a", "colour = \"red\""));
    let no_kernel = write(
        "kernel.toml",
        "[[vm]]\nname = \"l\"\nkernel = \"no-such-bzImage\"\n",
    );
    let dup = write("dup.toml", &format!("{}{}", vm("a", ""), vm("a", "")));
    let sizes = write(
        "sizes.toml",
        &format!("{}{}", vm("a", ""), vm("b", "memory = \"64M\"")),
    );
    let run_dir = dir.join("run");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--vms".into(), "0".into()],
            "--vms must be between 1 and",
        ),
        (
            vec!["--vms".into(), "65".into()],
            "--vms must be between 1 and",
        ),
        (
            vec!["--vms".into(), "64".into(), "--mem".into(), "1T".into()],
            "exceeds the host",
        ),
        (vec!["fleet".into(), missing], "No such file"),
        (vec!["fleet".into(), malformed], "fleet file"),
        (vec!["fleet".into(), unknown], "unknown field `colour`"),
        (vec!["fleet".into(), no_kernel], "no-such-bzImage"),
        (vec!["fleet".into(), dup], "two VMs are named \"a\""),
        (
            vec!["fleet".into(), sizes],
            "memory size (64 MiB) differs from a's",
        ),
    ];
    for (mut args, expected) in cases {
        args.extend(["--run-dir".into(), run_dir.to_str().expect("utf-8").into()]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_vmm(&argv, Duration::from_secs(30));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{argv:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{argv:?}: one line: {stderr}");
        assert!(stderr.contains(expected), "{argv:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(files_in(&run_dir).is_empty(), "{argv:?} left files");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn linux_clones_boot_to_init_and_share_the_kernel() {
    let Some((kernel, initrd)) = reference_linux("linux_clones_boot_to_init_and_share_the_kernel")
    else {
        return;
    };
    let dir = scratch("fleet-linux");
    let stats_path = dir.join("stats.json");
    let logs = dir.join("logs");
    let out = run_vmm(
        &[
            "--vms",
            "2",
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--initrd",
            initrd.to_str().expect("utf-8"),
            "--mem",
            "256M",
            "--log-dir",
            logs.to_str().expect("utf-8"),
            "--stats",
            stats_path.to_str().expect("utf-8"),
            "--timeout",
            "840",
        ],
        Duration::from_secs(900),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json = stats(&stats_path);
    for (i, vm) in json["vms"].as_array().expect("vms").iter().enumerate() {
        let log = std::fs::read_to_string(logs.join(format!("vm{i}.log"))).expect("log");
        assert!(log.contains("Run /init"), "vm{i} log: {log}");
        assert!(log.contains("mirrorball: profiler ready"), "vm{i} log");
        let memory = &vm["memory"];
        assert_eq!(memory["cloned"], true);
        // What the kernel never wrote (much of its text, the initramfs until unpacked) stays the
        // template's; a loaded (not booted) template shares little of a Linux guest: on PVM
        // about 400 pages of 65,536 (alternatives patching and the boot itself write the rest).
        let (shared, private) = (
            memory["total"]["shared"].as_u64().unwrap_or(0),
            memory["total"]["private"].as_u64().unwrap_or(0),
        );
        assert!(shared > 0, "vm{i}: {memory}");
        assert!(shared + private <= 65_536, "vm{i}: {memory}");
        assert_eq!(
            memory["cow_breaks"].as_u64(),
            Some(private),
            "vm{i}: {memory}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vmm record` of a clone has the VM's memory at each sharing scan (`memory` rows) and the
/// writer's copy-on-write breaks in its host rows (memory records), summing to exactly the pages
/// it wrote.
#[test]
fn record_has_memory_rows_and_the_writers_cow_breaks() {
    if !kvm_available("record_has_memory_rows_and_the_writers_cow_breaks") {
        return;
    }
    let spec_text = "update 4 L 60000 10";
    let spec: TaskSpec = spec_text.parse().expect("spec");
    let plan = layout(std::slice::from_ref(&spec), 1).expect("layout");
    let (pages, _) = replay(&spec, &plan.tasks[0]);
    let dir = scratch("record-cow");
    let run_dir = dir.join("run");
    let out = dir.join("record.csv");
    let recorder = std::process::Command::new(common::vmm_bin())
        .args(["record", "--wait", "120", "--run-dir"])
        .arg(&run_dir)
        .arg("-o")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vmm record");
    let args = ["--vms", "1", "--share", "template", "--workload", spec_text];
    let run_dir_text = run_dir.to_str().expect("utf-8");
    let vm = run_vmm(
        &[&args[..], &["--run-dir", run_dir_text]].concat(),
        DEADLINE,
    );
    assert_eq!(vm.status.code(), Some(0), "{}", text(&vm.stderr));
    let rec = recorder.wait_with_output().expect("recorder");
    assert!(rec.status.success(), "{}", text(&rec.stderr));
    let recording = mirrorball_monitor::record::read_record(&out).expect("record");
    let memory: Vec<_> = recording
        .rows
        .iter()
        .filter_map(|r| match r {
            mirrorball_monitor::record::Row::Memory(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    assert!(!memory.is_empty(), "no memory rows: {}", text(&rec.stderr));
    let last = memory.last().expect("a memory row");
    assert_eq!(last.flags, 1, "a clone: {last:?}");
    assert!(last.ram_pages * 4096 >= plan.ram_bytes, "{last:?}");
    assert!(last.private_pages >= pages, "{last:?}");
    let charged: u64 = recording
        .host()
        .filter(|h| h.attribution == "memory" && h.pid == 1)
        .map(|h| h.cow_breaks)
        .sum();
    assert_eq!(
        charged, pages,
        "the writer's breaks, charged to it in the host ring"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The host's KSM settings, restored when dropped (the test turns KSM on for itself).
struct KsmOn {
    saved: Vec<(&'static str, String)>,
}

impl KsmOn {
    const DIR: &'static str = "/sys/kernel/mm/ksm";

    fn enable() -> std::io::Result<Self> {
        let mut saved = Vec::new();
        for (knob, value) in [("pages_to_scan", "2000"), ("run", "1")] {
            let path = Path::new(Self::DIR).join(knob);
            saved.push((knob, std::fs::read_to_string(&path)?.trim().to_string()));
            std::fs::write(&path, value)?;
        }
        Ok(Self { saved })
    }
}

impl Drop for KsmOn {
    fn drop(&mut self) {
        for (knob, value) in self.saved.iter().rev() {
            let _ = std::fs::write(Path::new(Self::DIR).join(knob), value);
        }
    }
}

/// `--ksm` with memory of their own (`--share none`): KSM merges the identical data sets two
/// VMs read, and the accounting counts the merged pages in the reading task's region; without
/// `--ksm` nothing is merged.
#[test]
fn ksm_merges_identical_data_sets_of_two_vms() {
    if !kvm_available("ksm_merges_identical_data_sets_of_two_vms") {
        return;
    }
    let _ksm = match KsmOn::enable() {
        Ok(k) => k,
        Err(e) => {
            skip_or_fail(
                "ksm_merges_identical_data_sets_of_two_vms",
                &format!("cannot turn KSM on (root and /sys/kernel/mm/ksm needed): {e}"),
            );
            return;
        }
    };
    let dir = scratch("ksm");
    let stats_path = dir.join("stats.json");
    let merged = |ksm: bool| -> Vec<(u64, u64)> {
        let mut args = vec!["--vms", "2", "--share", "none", "--vcpus", "1"];
        args.extend(["--workload", "read 4 R 400000 150"]);
        args.extend(["--stats", stats_path.to_str().expect("utf-8")]);
        if ksm {
            args.push("--ksm");
        }
        let out = run_vmm(&args, DEADLINE);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        if ksm {
            assert!(stderr.contains("merged pages"), "{stderr}");
        }
        let json = stats(&stats_path);
        json["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .map(|vm| {
                let total = vm["memory"]["total"]["merged"].as_u64().unwrap_or(0);
                let task = vm["tasks"][0]["memory"]["pages"]["merged"]
                    .as_u64()
                    .unwrap_or(0);
                (total, task)
            })
            .collect()
    };
    assert!(
        merged(false).iter().all(|&m| m == (0, 0)),
        "nothing merges without --ksm"
    );
    // The VM that ends first still shares its data set with the other (the other's copy, once
    // alone, is no longer counted as merged): 1,024 pages of 4 MiB, all read, all identical.
    let with = merged(true);
    let best = with.iter().map(|&(_, task)| task).max().unwrap_or(0);
    assert!(best >= 1000, "merged pages per VM (all, task): {with:?}");
    assert!(with.iter().all(|&(total, task)| total >= task), "{with:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// vCPUs let go together that outnumber the host's CPUs each give up their CPU once, after a
/// first slice of guest time (a kick exit, then a yield): none waits for the scheduler's next
/// tick to start its guest. A VM whose vCPUs fit on the CPUs is never kicked. The guests'
/// results are those of an undisturbed run.
#[test]
fn vcpus_that_outnumber_the_cpus_get_a_first_slice() {
    if !kvm_available("vcpus_that_outnumber_the_cpus_get_a_first_slice") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let dir = scratch("fleet-first-slice");
    // One long iteration: the guest's first exit of its own comes after its whole run.
    const SPEC: &str = "work 4 R 200000 1";
    let run = |vms: usize| -> Vec<Value> {
        let stats_path = dir.join(format!("stats-{vms}.json"));
        let out = run_vmm(
            &[
                "--vms",
                &vms.to_string(),
                "--workload",
                SPEC,
                "--stats",
                stats_path.to_str().expect("utf-8"),
                "--run-dir",
                dir.join("run").to_str().expect("utf-8"),
            ],
            DEADLINE,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let json = stats(&stats_path);
        match json["vms"].as_array() {
            Some(vms) => vms.clone(),
            None => vec![json],
        }
    };
    let spec: TaskSpec = SPEC.parse().expect("spec");
    let plan = layout(std::slice::from_ref(&spec), 1).expect("layout");
    let checksum = u64::from(replay(&spec, &plan.tasks[0]).1);
    for (vms, kicks) in [(cpus + 1, 1), (1, 0)] {
        for vm in run(vms) {
            assert_eq!(vm["tasks"][0]["checksum"].as_u64(), Some(checksum), "{vm}");
            let exits = &vm["vcpus"][0]["exits"];
            assert_eq!(exits["intr"].as_u64(), Some(kicks), "{vms} VMs: {exits}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The threads that launch a fleet start on another CPU than the launching thread's, but what
/// they start in turn — every VM's vCPU threads and sampler — may run on every CPU the process
/// may: none stays bound to the CPU its launcher was put on. (The launching helpers themselves
/// are narrowed to another CPU for a moment by design, until they start: a look at /proc in that
/// window would see them so, and a helper not yet named is a "vmm" thread; so only the threads
/// they start are checked.)
#[test]
fn every_vm_thread_may_run_on_every_cpu_of_the_process() {
    if !kvm_available("every_vm_thread_may_run_on_every_cpu_of_the_process") {
        return;
    }
    let dir = scratch("fleet-affinity");
    let run_dir = dir.join("run");
    let mut child = common::spawn_vmm(&[
        "--vms",
        "4",
        "--workload",
        "work 4 R 40000000 1",
        "--run-dir",
        run_dir.to_str().expect("utf-8"),
    ]);
    let pid = child.id();
    let allowed = |task: &Path| -> Option<String> {
        let status = std::fs::read_to_string(task.join("status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string())
    };
    let main = allowed(&PathBuf::from(format!("/proc/{pid}/task/{pid}"))).expect("main thread");
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let (status, stderr) = common::wait_watching(&mut child, DEADLINE, "affinity", || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let started_by_a_helper = comm.starts_with("vcpu") || comm.trim() == "sampler";
            if !started_by_a_helper {
                continue;
            }
            if let Some(cpus) = allowed(&task.path()) {
                seen.insert((comm.trim().to_string(), cpus));
            }
        }
    });
    assert!(status.success(), "{stderr}");
    assert!(
        seen.iter().any(|(comm, _)| comm.starts_with("vcpu")),
        "no vCPU thread seen: {seen:?}"
    );
    for (comm, cpus) in &seen {
        assert_eq!(
            cpus, &main,
            "{comm} may run on {cpus}, the process on {main}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
