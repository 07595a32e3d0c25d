//! Where a snapshot cannot go, and a stop during one (`vmm ctl NAME snapshot DIR`, vmm/CONTROL.md):
//! a directory on a read-only file system or on a full one (small tmpfs mounts, so these tests
//! need root: they skip without it, and fail under CI) is refused with one line naming the
//! problem (`vmm ctl` exit code 21), nothing of the snapshot is left there, and the VM, running
//! again, finishes with the results of an uninterrupted run. A `stop` that another client sends
//! while a snapshot is being written is answered after it: the snapshot is complete (its restore
//! finishes like an uninterrupted run) and the VM ends as stopped through the control socket; a
//! snapshot request that comes with a stop is refused and creates nothing.
mod common;

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{kvm_available, read_json, root_and, run_vmm, skip_or_fail, text, vmm_bin};

/// About 2 s of guest work in a debug build when idle (4 with 120 iterations), long enough for
/// the few requests the refusal tests send; deterministic results.
const SPEC: &str = "work 16 R 3000000 60";
/// A VM whose snapshot takes a while: 128 MiB of data set (every page non-zero) to write, about
/// 0.4 s in a debug build; 30 iterations of about 0.13 s each.
const BIG_SPEC: &str = "read 128 R 3000000 30";
const DEADLINE: Duration = Duration::from_secs(120);
/// Longest a stopped VM may take to end.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mb-snaptarget-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path")
}

/// A tmpfs mounted for one test; unmounted (lazily: `MNT_DETACH`) when dropped, even when the
/// test fails.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `path` (created), read-only when `read_only`.
    fn mount(path: &Path, size: &str, read_only: bool) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let target = c_path(path);
        let data = CString::new(format!("size={size},mode=0755")).expect("no NUL");
        let flags = libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC
            | if read_only { libc::MS_RDONLY } else { 0 };
        // SAFETY: mount reads four NUL-terminated strings that outlive the call; it writes no
        // memory of this process.
        let rc = unsafe {
            libc::mount(
                c"none".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "cannot mount a tmpfs on {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Names in the mount's root.
    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.path)
            .expect("read the mount")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Free blocks of the file system.
    fn free_blocks(&self) -> u64 {
        let path = c_path(&self.path);
        // SAFETY: statvfs is plain data; all-zero bytes are a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs reads a NUL-terminated path that outlives the call and writes only
        // into `st`, which it may fill entirely.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        st.f_bfree
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = c_path(&self.path);
        // SAFETY: umount2 reads a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A tmpfs for `test`, or `None` after saying why it cannot run (no KVM, not root, the mount
/// failed: it skips, or fails under CI).
fn tmpfs_for(test: &str, path: &Path, size: &str, read_only: bool) -> Option<Tmpfs> {
    if !root_and(test, "tmpfs mounts", true) {
        return None;
    }
    match Tmpfs::mount(path, size, read_only) {
        Ok(mount) => Some(mount),
        Err(why) => {
            skip_or_fail(test, &why);
            None
        }
    }
}

/// A `vmm` running one VM (`vm0`) in a private run directory; killed if the test fails first.
struct Vmm {
    child: Option<Child>,
    run_dir: PathBuf,
}

impl Vmm {
    fn start(run_dir: &Path, spec: &str, stats: &Path) -> Self {
        let child = Command::new(vmm_bin())
            .args(["--workload", spec, "--vcpus", "1", "--timeout", "100"])
            .arg("--stats")
            .arg(stats)
            .env("MIRRORBALL_RUN_DIR", run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        Self {
            child: Some(child),
            run_dir: run_dir.to_path_buf(),
        }
    }

    /// `vmm ctl ARGS`, retried while the VM has not published its socket yet.
    fn ctl(&self, args: &[&str]) -> Output {
        let start = Instant::now();
        loop {
            let out = Command::new(vmm_bin())
                .arg("ctl")
                .args(args)
                .arg("--run-dir")
                .arg(&self.run_dir)
                .args(["--timeout", "30"])
                .output()
                .expect("vmm ctl");
            if out.status.code() != Some(20) || start.elapsed() > Duration::from_secs(20) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VM's state per `vmm ctl vm0 status`.
    fn state(&self) -> String {
        let out = self.ctl(&["vm0", "status"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reply");
        reply["state"].as_str().unwrap_or_default().to_string()
    }

    /// The control socket, once it appeared.
    fn socket(&self) -> PathBuf {
        common::control_socket(&self.run_dir)
    }

    /// Waits for the end (at most `deadline`): exit code and stderr.
    fn wait(mut self, deadline: Duration) -> (Option<i32>, String) {
        let mut child = self.child.take().expect("running");
        let (status, stderr) = common::wait_watching(&mut child, deadline, "vmm", || {});
        (status.code(), stderr)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The results of an uninterrupted run of `spec` on one vCPU.
fn uninterrupted(spec: &str, stats: &Path) -> Vec<(u64, bool, u64, u64)> {
    let out = run_vmm(
        &["--workload", spec, "--vcpus", "1", "--stats", utf8(stats)],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let truth = common::task_results(&read_json(stats));
    assert!(
        truth.len() == 1 && truth[0].1 && truth[0].2 != 0,
        "{truth:?}"
    );
    truth
}

/// [`SPEC`]'s uninterrupted results, computed once for the tests that need them.
fn truth() -> &'static Vec<(u64, bool, u64, u64)> {
    static TRUTH: OnceLock<Vec<(u64, bool, u64, u64)>> = OnceLock::new();
    TRUTH.get_or_init(|| {
        let dir = scratch("truth");
        let truth = uninterrupted(SPEC, &dir.join("plain.json"));
        let _ = std::fs::remove_dir_all(&dir);
        truth
    })
}

/// `vmm ctl vm0 snapshot TARGET` is refused with exit code 21 and one line holding `expect`.
fn refused(vmm: &Vmm, target: &Path, expect: &str) {
    let out = vmm.ctl(&["vm0", "snapshot", utf8(target)]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(21), "{}: {err}", target.display());
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(expect),
        "{}: expected {expect:?}: {err}",
        target.display()
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reply line");
    assert_eq!(reply["ok"], false, "{reply}");
    // Not left paused by the failure.
    assert_eq!(vmm.state(), "running", "after {}", target.display());
}

/// The VM ran on and finished like an uninterrupted run.
fn finishes_like_an_uninterrupted_run(vmm: Vmm, stats: &Path) {
    let (code, err) = vmm.wait(DEADLINE);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("workload finished"), "{err}");
    assert_eq!(
        &common::task_results(&read_json(stats)),
        truth(),
        "the refused VM's results"
    );
}

#[test]
fn a_snapshot_on_a_read_only_file_system_is_refused_and_leaves_nothing() {
    let test = "a_snapshot_on_a_read_only_file_system_is_refused_and_leaves_nothing";
    let dir = scratch("ro");
    let Some(ro) = tmpfs_for(test, &dir.join("ro"), "1m", true) else {
        return;
    };
    let stats = dir.join("stats.json");
    let vmm = Vmm::start(&dir, SPEC, &stats);
    // A new directory cannot be made there; in the (empty) mount's root the first file cannot
    // be created, after the VM was paused and its vCPUs read.
    refused(&vmm, &ro.path.join("snap"), "Read-only file system");
    refused(&vmm, &ro.path, "Read-only file system");
    assert_eq!(ro.entries(), Vec::<String>::new(), "nothing left behind");
    finishes_like_an_uninterrupted_run(vmm, &stats);
    drop(ro);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_snapshot_on_a_full_file_system_is_refused_and_leaves_nothing() {
    let test = "a_snapshot_on_a_full_file_system_is_refused_and_leaves_nothing";
    let dir = scratch("full");
    // 256 KiB: the VM's memory file (16 MiB touched) cannot fit.
    let Some(full) = tmpfs_for(test, &dir.join("full"), "256k", false) else {
        return;
    };
    let free = full.free_blocks();
    let stats = dir.join("stats.json");
    let vmm = Vmm::start(&dir, SPEC, &stats);
    // A directory the request creates goes with the files; the mount's root stays, emptied.
    refused(&vmm, &full.path.join("snap"), "No space left on device");
    assert_eq!(full.entries(), Vec::<String>::new(), "nothing left behind");
    refused(&vmm, &full.path, "No space left on device");
    assert_eq!(full.entries(), Vec::<String>::new(), "nothing left behind");
    assert_eq!(full.free_blocks(), free, "the space is given back");
    finishes_like_an_uninterrupted_run(vmm, &stats);
    drop(full);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends one request line on `stream` (no reply read).
fn send_line(stream: &mut UnixStream, line: &str) {
    stream.write_all(line.as_bytes()).expect("send");
}

/// Reads one JSON reply line from `reader`.
fn reply(reader: &mut impl BufRead) -> serde_json::Value {
    let mut line = String::new();
    reader.read_line(&mut line).expect("reply");
    assert!(line.ends_with('\n'), "one whole line: {line:?}");
    serde_json::from_str(&line).expect("reply is JSON")
}

#[test]
fn a_stop_during_a_snapshot_ends_the_vm_after_a_complete_snapshot() {
    if !kvm_available("a_stop_during_a_snapshot_ends_the_vm_after_a_complete_snapshot") {
        return;
    }
    let dir = scratch("stop");
    let snap = dir.join("snap");
    let vmm = Vmm::start(&dir, BIG_SPEC, &dir.join("orig.json"));
    let mut a = UnixStream::connect(vmm.socket()).expect("client a");
    a.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let request = serde_json::json!({"cmd": "snapshot", "dir": utf8(&snap), "id": 1});
    send_line(&mut a, &format!("{request}\n"));
    // The memory file appears once the VM is paused and its vCPUs read: the snapshot is being
    // written. Another client stops the VM then.
    let start = Instant::now();
    while !snap.join("memory.bin").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no memory.bin");
        std::thread::sleep(Duration::from_millis(1));
    }
    // No reply yet (whatever arrives is kept in the reader for below).
    let mut reader = BufReader::new(&a);
    a.set_nonblocking(true).expect("nonblocking");
    let pending = matches!(reader.fill_buf(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    let stop_sent = Instant::now();
    let out = vmm.ctl(&["vm0", "stop"]);
    let stop_took = stop_sent.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stop reply");
    assert_eq!(stopped["state"], "ending", "{stopped}");
    a.set_nonblocking(false).expect("blocking");
    let snapshot = reply(&mut reader);
    assert!(
        pending,
        "the snapshot was answered before the stop was sent: {snapshot}"
    );
    // The loop serves one request after the other: the snapshot was finished, then the stop.
    assert_eq!(
        (&snapshot["ok"], &snapshot["id"]),
        (&true.into(), &1.into()),
        "{snapshot}"
    );
    let ended = Instant::now();
    let (code, err) = vmm.wait(STOP_DEADLINE);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("stopped through the control socket"), "{err}");
    eprintln!(
        "snapshot paused the VM {:.0} ms; the stop was answered {:.0} ms after it was sent; \
         the VM ended {:.0} ms later",
        snapshot["detail"]["pause_ms"].as_f64().unwrap_or(0.0),
        stop_took.as_secs_f64() * 1e3,
        ended.elapsed().as_secs_f64() * 1e3
    );

    // The snapshot is complete: taken mid-run, it restores and finishes like an uninterrupted
    // run.
    let state = read_json(&snap.join("state.json"));
    let done = state["workload"][0]["iterations"]
        .as_u64()
        .expect("iterations");
    assert!(done < 30, "snapshot not mid-run: {done} iterations");
    let restored = dir.join("restored.json");
    let out = run_vmm(
        &["--restore", utf8(&snap), "--stats", utf8(&restored)],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let clone = read_json(&restored);
    assert_eq!(
        clone["end"]["kind"], "workload_finished",
        "{}",
        clone["end"]
    );
    let truth = uninterrupted(BIG_SPEC, &dir.join("plain.json"));
    assert_eq!(common::task_results(&clone), truth, "the restored clone");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_snapshot_that_comes_with_a_stop_is_refused_and_creates_nothing() {
    if !kvm_available("a_snapshot_that_comes_with_a_stop_is_refused_and_creates_nothing") {
        return;
    }
    let dir = scratch("after-stop");
    let snap = dir.join("snap");
    let vmm = Vmm::start(&dir, "work 16 R 3000000 1000", &dir.join("orig.json"));
    let mut a = UnixStream::connect(vmm.socket()).expect("client");
    a.set_read_timeout(Some(Duration::from_secs(30))).ok();
    // Both lines in one write: served in one turn of the loop, in order.
    let snapshot = serde_json::json!({"cmd": "snapshot", "dir": utf8(&snap), "id": 2});
    send_line(
        &mut a,
        &format!("{{\"cmd\":\"stop\",\"id\":1}}\n{snapshot}\n"),
    );
    let mut reader = BufReader::new(&a);
    let stop = reply(&mut reader);
    assert_eq!(
        (&stop["ok"], &stop["state"]),
        (&true.into(), &"ending".into()),
        "{stop}"
    );
    let snapshot = reply(&mut reader);
    assert_eq!(
        (&snapshot["ok"], &snapshot["id"]),
        (&false.into(), &2.into()),
        "{snapshot}"
    );
    let why = snapshot["error"].as_str().unwrap_or_default();
    assert!(why.contains("ending") && !why.contains('\n'), "{snapshot}");
    let (code, err) = vmm.wait(STOP_DEADLINE);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("stopped through the control socket"), "{err}");
    assert!(!snap.exists(), "a refused snapshot creates nothing");
    let _ = std::fs::remove_dir_all(&dir);
}
