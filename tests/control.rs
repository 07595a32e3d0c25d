//! The control socket of a running VM (`vmm ctl`, vmm/CONTROL.md), driven against the OS-less
//! workload guest: pause really parks the vCPU (its thread stops using CPU and the host region
//! says paused), resume lets it go on, stop ends the VM with code 0; two clients at once; garbage
//! and over-long lines get one error line each and leave the VM untouched; an unknown name is
//! exit code 20.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, vmm_bin};

/// A `vmm` running a long workload in a private run directory.
struct Vmm {
    child: Child,
    run_dir: PathBuf,
}

impl Vmm {
    fn start(test: &str, workload: &str) -> Self {
        let run_dir = std::env::temp_dir().join(format!("mb-ctl-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        let child = Command::new(vmm_bin())
            .args(["--workload", workload, "--vcpus", "1", "--timeout", "120"])
            .env("MIRRORBALL_RUN_DIR", &run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        Self { child, run_dir }
    }

    /// The control socket, once it appeared.
    fn socket(&self) -> PathBuf {
        common::control_socket(&self.run_dir)
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(vmm_bin())
            .arg("ctl")
            .args(args)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .output()
            .expect("vmm ctl")
    }

    fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ctl(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("reply is JSON")
    }

    fn wait(mut self) -> (Option<i32>, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (status.code(), err);
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("vmm did not end");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// CPU ticks (user + system) of the VMM thread called `comm`.
fn thread_ticks(pid: u32, comm: &str) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
        let after = &stat[stat.rfind(')').expect("comm end") + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime); `after` starts at field 3.
        return fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("st");
    }
    panic!("no thread {comm}");
}

/// The host region's `vm_state` (ABI minor 3) at offset 152 of the header.
fn host_vm_state(socket: &Path) -> u64 {
    let bytes = std::fs::read(socket.with_extension("host")).expect("host region");
    u64::from_le_bytes(bytes[152..160].try_into().expect("8 bytes"))
}

fn send(stream: &mut UnixStream, line: &[u8]) -> serde_json::Value {
    stream.write_all(line).expect("send");
    let mut reply = String::new();
    BufReader::new(&*stream)
        .read_line(&mut reply)
        .expect("reply");
    assert!(reply.ends_with('\n'), "{reply:?}");
    serde_json::from_str(&reply).expect("reply is one JSON line")
}

#[test]
fn pause_resume_status_stop() {
    if !kvm_available("pause_resume_status_stop") {
        return;
    }
    let vmm = Vmm::start("prs", "work 64 R 100000000");
    let socket = vmm.socket();
    let pid = vmm.child.id();
    assert_eq!(vmm.ctl_json(&["vm0", "status"])["state"], "running");
    std::thread::sleep(Duration::from_millis(300));
    let running = thread_ticks(pid, "vcpu0");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        thread_ticks(pid, "vcpu0") > running + 20,
        "the vCPU should be busy"
    );
    let reply = vmm.ctl_json(&["vm0", "pause"]);
    assert_eq!(reply["state"], "paused", "{reply}");
    assert_eq!(host_vm_state(&socket) & 1, 1, "host region says paused");
    let paused = thread_ticks(pid, "vcpu0");
    std::thread::sleep(Duration::from_millis(800));
    let later = thread_ticks(pid, "vcpu0");
    assert!(
        later <= paused + 2,
        "a paused vCPU ran: {paused} -> {later}"
    );
    // The id of the VM (PID-N) works as its name.
    let id = socket
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("stem")
        .to_string();
    assert_eq!(vmm.ctl_json(&[&id, "status"])["state"], "paused");
    assert_eq!(vmm.ctl_json(&["vm0", "resume"])["state"], "running");
    assert_eq!(host_vm_state(&socket) & 1, 0, "host region says running");
    std::thread::sleep(Duration::from_millis(500));
    assert!(thread_ticks(pid, "vcpu0") > later + 20, "resumed vCPU runs");
    assert_eq!(vmm.ctl_json(&["vm0", "stop"])["state"], "ending");
    let (code, err) = vmm.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("stopped through the control socket"), "{err}");
}

#[test]
fn two_clients_garbage_and_unknown_names() {
    if !kvm_available("two_clients_garbage_and_unknown_names") {
        return;
    }
    let vmm = Vmm::start("two", "work 16 R 100000000");
    let socket = vmm.socket();
    let mut a = UnixStream::connect(&socket).expect("client a");
    let mut b = UnixStream::connect(&socket).expect("client b");
    a.set_read_timeout(Some(Duration::from_secs(10))).ok();
    b.set_read_timeout(Some(Duration::from_secs(10))).ok();
    // Half a request from a does not hold up b.
    a.write_all(br#"{"cmd":"sta"#).expect("half");
    let r = send(&mut b, b"{\"cmd\":\"pause\",\"id\":2}\n");
    assert_eq!((r["ok"].clone(), r["id"].clone()), (true.into(), 2.into()));
    let r = send(&mut a, b"tus\",\"id\":1}\n");
    assert_eq!(r["state"], "paused", "{r}");
    assert_eq!(r["id"], 1);
    // Garbage, an unknown command and an over-long line: one error line each, VM untouched.
    for bad in [
        &b"garbage\n"[..],
        b"{\"cmd\":\"reboot\"}\n",
        b"\xff\xfe\n",
        &[b'x'; 10_000][..],
    ] {
        let mut line = bad.to_vec();
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let r = send(&mut b, &line);
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    }
    let r = send(&mut a, b"{\"cmd\":\"status\"}\n");
    assert_eq!(r["state"], "paused", "garbage changed nothing: {r}");
    let r = send(&mut a, b"{\"cmd\":\"resume\"}\n");
    assert_eq!(r["state"], "running", "{r}");
    // Unknown names: one line, exit code 20.
    let out = vmm.ctl(&["no-such-vm", "status"]);
    assert_eq!(out.status.code(), Some(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no-such-vm"), "{err}");
    let out = vmm.ctl(&["vm0", "status", "/tmp/x"]);
    assert_ne!(out.status.code(), Some(0));
    drop(a);
    let r = send(&mut b, b"{\"cmd\":\"stop\"}\n");
    assert_eq!(r["ok"], true, "{r}");
    let (code, err) = vmm.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(!socket.exists(), "the socket is removed with the VM");
}
