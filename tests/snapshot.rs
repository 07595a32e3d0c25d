//! Snapshots of the OS-less workload guest (`vmm ctl NAME snapshot DIR`, `vmm --restore DIR`):
//! a VM snapshotted mid-run and restored as several clones finishes in every clone with the
//! same per-task results (checksum, iterations, guest minor faults) as an uninterrupted run;
//! bad snapshots (missing, truncated, corrupted, wrong version, foreign host) and bad snapshot
//! directories are refused with one line and exit code 22 (restore) or 21 (ctl), leaving
//! running VMs untouched.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, read_json, run_vmm, text, vmm_bin};

/// About 2.5 s of guest work in a debug build; deterministic results.
/// 120 iterations: about 4 s on an idle machine, so the snapshot 1.5 s in always lands mid-run
/// (with 40 the whole run took 1.4 s when idle and ended before the snapshot; CI saw it).
const SPEC: &str = "work 16 R 3000000 120";
const DEADLINE: Duration = Duration::from_secs(120);

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mb-snap-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

fn spawn(run_dir: &Path, stats: &Path) -> Child {
    Command::new(vmm_bin())
        .args([
            "--workload",
            SPEC,
            "--vcpus",
            "1",
            "--timeout",
            "100",
            "--stats",
        ])
        .arg(stats)
        .env("MIRRORBALL_RUN_DIR", run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

fn ctl(run_dir: &Path, args: &[&str]) -> std::process::Output {
    let start = Instant::now();
    loop {
        let out = Command::new(vmm_bin())
            .arg("ctl")
            .args(args)
            .arg("--run-dir")
            .arg(run_dir)
            .output()
            .expect("vmm ctl");
        // The VM may not have published its socket yet.
        if out.status.code() != Some(20) || start.elapsed() > Duration::from_secs(20) {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait(mut child: Child) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s.code().unwrap_or(-1);
        }
        assert!(start.elapsed() < DEADLINE, "vmm did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes a snapshot of a running VM mid-run into `snap`; returns the VM's own stats.
fn snapshot_mid_run(dir: &Path, snap: &Path) -> serde_json::Value {
    let stats = dir.join("orig.json");
    let child = spawn(dir, &stats);
    // The first of the 120 iterations takes 0.8-0.9 s on a loaded PVM machine; the run ~4 s idle.
    std::thread::sleep(Duration::from_millis(1500));
    let out = ctl(dir, &["vm0", "snapshot", snap.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reply");
    assert_eq!(
        reply["state"], "running",
        "resumed after the snapshot: {reply}"
    );
    assert!(reply["detail"]["pause_ms"].as_f64().is_some(), "{reply}");
    assert_eq!(wait(child), 0);
    read_json(&stats)
}

#[test]
fn clones_of_a_mid_run_snapshot_finish_like_an_uninterrupted_run() {
    if !kvm_available("clones_of_a_mid_run_snapshot_finish_like_an_uninterrupted_run") {
        return;
    }
    let dir = scratch("clones");
    // The truth: an uninterrupted run.
    let plain = dir.join("plain.json");
    let out = run_vmm(
        &[
            "--workload",
            SPEC,
            "--vcpus",
            "1",
            "--stats",
            plain.to_str().expect("utf-8"),
        ],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let truth = common::task_results(&read_json(&plain));
    assert_eq!(truth.len(), 1);
    assert!(
        truth[0].1 && truth[0].0 == 120 && truth[0].2 != 0,
        "{truth:?}"
    );

    let snap = dir.join("snap");
    let original = snapshot_mid_run(&dir, &snap);
    assert_eq!(
        common::task_results(&original),
        truth,
        "the snapshotted VM itself"
    );
    let state = read_json(&snap.join("state.json"));
    let done = state["workload"][0]["iterations"]
        .as_u64()
        .expect("iterations");
    assert!(
        0 < done && done < 120,
        "snapshot not mid-run: {done} iterations"
    );
    // Sparse: far less allocated than the 32 MiB of RAM... but the touched pages are there.
    let mem = std::fs::metadata(snap.join("memory.bin")).expect("memory");
    assert_eq!(mem.len(), state["vm"]["mem_bytes"].as_u64().expect("size"));

    let stats = dir.join("clones.json");
    let out = run_vmm(
        &[
            "--restore",
            snap.to_str().expect("utf-8"),
            "--vms",
            "3",
            "--stats",
            stats.to_str().expect("utf-8"),
        ],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let clones = read_json(&stats);
    let vms = clones["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 3);
    for vm in vms {
        assert_eq!(common::task_results(vm), truth, "clone {}", vm["name"]);
        assert_eq!(vm["end"]["kind"], "workload_finished");
        // Each clone's RAM is a copy-on-write clone of the snapshot's memory file.
        assert_eq!(vm["memory"]["cloned"], true, "{}", vm["memory"]);
    }

    // A fleet file mixing a clone of the snapshot (`restore`, relative to the file) with a VM
    // booted afresh: both finish like the uninterrupted run, each reported under its name.
    let fleet = dir.join("fleet.toml");
    std::fs::write(
        &fleet,
        format!(
            "[[vm]]\nname = \"fresh\"\nworkload = [\"{SPEC}\"]\nvcpus = 1\n\n\
             [[vm]]\nname = \"clone\"\nrestore = \"snap\"\n"
        ),
    )
    .expect("fleet file");
    let stats = dir.join("fleet.json");
    let out = run_vmm(
        &[
            "fleet",
            fleet.to_str().expect("utf-8"),
            "--stats",
            stats.to_str().expect("utf-8"),
        ],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let fleet = read_json(&stats);
    let vms = fleet["vms"].as_array().expect("vms");
    let names: Vec<_> = vms.iter().map(|v| v["name"].clone()).collect();
    assert_eq!(names, ["fresh", "clone"], "in the file's order");
    for vm in vms {
        assert_eq!(common::task_results(vm), truth, "{}", vm["name"]);
    }
    assert_eq!(vms[1]["memory"]["cloned"], true, "{}", vms[1]["memory"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rewrites `state.json` through `edit` and fixes its checksum.
fn edit_state(snap: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut state = read_json(&snap.join("state.json"));
    edit(&mut state);
    let bytes = serde_json::to_vec(&state).expect("encode");
    std::fs::write(snap.join("state.json"), &bytes).expect("write");
    std::fs::write(
        snap.join("checksum"),
        format!("crc32 state.json {:08x}\n", crc32(&bytes)),
    )
    .expect("write");
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// `vmm --restore SNAP` is refused with one line and exit code 22; so is a fleet file whose VMs
/// restore it (the fleet's closing table then names them refused).
fn refused(snap: &Path, expect: &str) {
    let out = run_vmm(&["--restore", snap.to_str().expect("utf-8")], DEADLINE);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(22), "{}: {err}", snap.display());
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(expect), "expected {expect:?}: {err}");
    let fleet = snap.with_extension("toml");
    let vm = |name: &str| format!("[[vm]]\nname = \"{name}\"\nrestore = {snap:?}\n");
    std::fs::write(&fleet, vm("a") + &vm("b")).expect("fleet file");
    let out = run_vmm(&["fleet", fleet.to_str().expect("utf-8")], DEADLINE);
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(22),
        "fleet, {}: {err}",
        snap.display()
    );
    assert!(err.contains(expect), "fleet: expected {expect:?}: {err}");
}

#[test]
fn bad_snapshots_and_directories_are_refused_with_one_line() {
    if !kvm_available("bad_snapshots_and_directories_are_refused_with_one_line") {
        return;
    }
    let dir = scratch("bad");
    let snap = dir.join("good");
    let stats = dir.join("orig.json");
    let child = spawn(&dir, &stats);
    std::thread::sleep(Duration::from_millis(300));
    // Bad directories: the VM answers with one error line and runs on.
    std::fs::create_dir_all(dir.join("full")).expect("mkdir");
    std::fs::write(dir.join("full/x"), b"x").expect("write");
    for (target, expect) in [
        (dir.join("no/such/parent"), "cannot create"),
        (dir.join("full"), "not empty"),
    ] {
        let out = ctl(&dir, &["vm0", "snapshot", target.to_str().expect("utf-8")]);
        assert_eq!(out.status.code(), Some(21), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(expect), "{}", text(&out.stderr));
    }
    let out = ctl(&dir, &["vm0", "snapshot", snap.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = ctl(&dir, &["vm0", "status"]);
    assert!(
        text(&out.stdout).contains("\"running\""),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(wait(child), 0, "the VM finished normally");
    assert!(common::task_results(&read_json(&stats))[0].1);

    // Missing.
    refused(&dir.join("missing"), "missing");
    // Truncated state file.
    let t = dir.join("truncated");
    copy_dir(&snap, &t);
    let state = std::fs::read(t.join("state.json")).expect("state");
    std::fs::write(t.join("state.json"), &state[..state.len() / 2]).expect("truncate");
    refused(&t, "checksum");
    // Truncated memory file.
    let t = dir.join("short-memory");
    copy_dir(&snap, &t);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(t.join("memory.bin"))
        .expect("open");
    f.set_len(1 << 20).expect("truncate");
    refused(&t, "truncated");
    // Corrupted memory: one byte of the guest image (page 0x400000 is data in every run).
    let t = dir.join("corrupt");
    copy_dir(&snap, &t);
    let mut mem = std::fs::read(t.join("memory.bin")).expect("mem");
    let at = mem.iter().position(|&b| b != 0).expect("some data");
    mem[at] ^= 0xff;
    std::fs::write(t.join("memory.bin"), &mem).expect("write");
    refused(&t, "memory.bin does not match");
    // A FIFO in place of a snapshot file: refused at once, not waited on.
    let t = dir.join("fifo");
    copy_dir(&snap, &t);
    std::fs::remove_file(t.join("checksum")).expect("remove");
    let fifo = std::ffi::CString::new(t.join("checksum").to_str().expect("utf-8")).expect("path");
    // SAFETY: mkfifo reads one NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    refused(&t, "checksum is not a regular file");
    // Wrong version.
    let t = dir.join("version");
    copy_dir(&snap, &t);
    edit_state(&t, |s| s["version"] = 99.into());
    refused(&t, "version 99");
    // Foreign host: another KVM kind, then a CPU feature this host does not have.
    let t = dir.join("foreign");
    copy_dir(&snap, &t);
    edit_state(&t, |s| s["host"]["kind"] = "some-other-kvm".into());
    refused(&t, "some-other-kvm");
    let t = dir.join("cpuid");
    copy_dir(&snap, &t);
    edit_state(&t, |s| {
        // Leaf 0x80000001 edx bit 31 (3DNow!) no current host offers.
        let edx = &mut s["vcpus"][0]["cpuid"][2][3];
        *edx = (edx.as_u64().expect("edx") | 1 << 31).into();
    });
    refused(&t, "lacks CPU features");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_after_a_time_restores_to_the_same_results() {
    if !kvm_available("snapshot_after_a_time_restores_to_the_same_results") {
        return;
    }
    let dir = scratch("after");
    let snap = dir.join("snap");
    let stats = dir.join("orig.json");
    let out = common::run_workload_snapshotted(SPEC, "0.5", &snap, &stats, DEADLINE);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("snapshot in"),
        "{}",
        text(&out.stderr)
    );
    let truth = common::task_results(&read_json(&stats));
    let done = read_json(&snap.join("state.json"))["workload"][0]["iterations"]
        .as_u64()
        .expect("iterations");
    assert!(done < 120, "{done}");
    let restored = dir.join("restored.json");
    let out = run_vmm(
        &[
            "--restore",
            snap.to_str().expect("utf-8"),
            "--stats",
            restored.to_str().expect("utf-8"),
        ],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(common::task_results(&read_json(&restored)), truth);
    // Bad trigger arguments: one line, exit code 1.
    let out = run_vmm(&["--snapshot-after", "soon", "/tmp/x"], DEADLINE);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("soon"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
