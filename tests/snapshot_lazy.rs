//! Lazy restore (`vmm --restore DIR --lazy`): clones whose memory is their own, loaded from the
//! snapshot's memory file on first touch through userfaultfd. Clones of a mid-run snapshot of
//! the OS-less workload finish like an uninterrupted run; each reports the pages it loaded
//! (never more than the snapshot holds, 16 at most per fault) and its vCPU is charged the
//! faults; a
//! snapshot taken from a lazy clone before it loaded everything restores to the same results;
//! `lazy` in a fleet file, and bad combinations, are checked too.
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{kvm_available, read_json, run_vmm, text};

/// As in `tests/snapshot.rs`: about 4 s of guest work, deterministic results.
const SPEC: &str = "work 16 R 3000000 120";
const DEADLINE: Duration = Duration::from_secs(120);

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mb-lazy-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

fn utf8(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8")
}

/// Whether userfaultfd works here (root, or unprivileged userfaultfd allowed).
fn uffd_usable(test: &str) -> bool {
    // SAFETY: the syscall takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        eprintln!(
            "skipping {test}: userfaultfd is not usable here: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    if let Ok(fd) = i32::try_from(fd) {
        // SAFETY: closes the descriptor just opened.
        unsafe { libc::close(fd) };
    }
    true
}

/// `vmm ARGS` is refused with exit code `code` and one line containing `expect`.
fn refused_in_one_line(args: &[&str], code: i32, expect: &str) {
    let out = run_vmm(args, DEADLINE);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(expect), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn lazy_clones_finish_like_an_uninterrupted_run_and_count_their_loads() {
    let test = "lazy_clones_finish_like_an_uninterrupted_run_and_count_their_loads";
    if !kvm_available(test) || !uffd_usable(test) {
        return;
    }
    let dir = scratch("clones");
    // The truth: a run snapshotted half a second in, which runs on to its end.
    let snap = dir.join("snap");
    let orig = dir.join("orig.json");
    let out = common::run_workload_snapshotted(SPEC, "0.5", &snap, &orig, DEADLINE);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let truth = common::task_results(&read_json(&orig));
    assert!(truth[0].1 && truth[0].0 == 120, "{truth:?}");
    let state = read_json(&snap.join("state.json"));
    let snapshot_pages = state["memory"]["pages"].as_u64().expect("pages");
    assert!(snapshot_pages > 0);

    // Two lazy clones, each snapshotted again 0.2 s after the restore.
    let again = dir.join("again");
    let stats = dir.join("lazy.json");
    let out = run_vmm(
        &[
            "--restore",
            utf8(&snap),
            "--lazy",
            "--vms",
            "2",
            "--snapshot-after",
            "0.2",
            utf8(&again),
            "--stats",
            utf8(&stats),
        ],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report = read_json(&stats);
    let vms = report["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 2);
    for vm in vms {
        assert_eq!(common::task_results(vm), truth, "clone {}", vm["name"]);
        let memory = &vm["memory"];
        assert_eq!(memory["cloned"], false, "memory of its own: {memory}");
        let lazy = &memory["lazy"];
        let figure = |name: &str| lazy[name].as_u64().expect(name);
        let (faults, loaded, zeroes) = (
            figure("faults"),
            figure("loaded_pages"),
            figure("zero_pages"),
        );
        assert!(
            0 < loaded && loaded <= snapshot_pages,
            "loaded {loaded} of the snapshot's {snapshot_pages} pages: {lazy}"
        );
        // One fault brings in a 64 KiB block (16 pages), fewer at the end of a mapping.
        assert!(
            (loaded + zeroes).div_ceil(16) <= faults && faults <= loaded + zeroes,
            "{lazy}"
        );
        assert_eq!(lazy["read_errors"], 0, "{lazy}");
        // The OS-less guest's first touches are all its vCPU thread's faults.
        let charged: u64 = vm["vcpus"]
            .as_array()
            .expect("vcpus")
            .iter()
            .map(|v| {
                v["host_major_faults"].as_u64().unwrap_or(0)
                    + v["host_minor_faults"].as_u64().unwrap_or(0)
            })
            .sum();
        assert!(
            charged >= faults,
            "vCPU faults {charged}, lazy faults {faults}"
        );
    }

    // The snapshot of a lazy clone holds the pages it had not loaded yet as well.
    let clone_snap = again.join("vm0");
    let restored = dir.join("restored.json");
    let out = run_vmm(
        &["--restore", utf8(&clone_snap), "--stats", utf8(&restored)],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(common::task_results(&read_json(&restored)), truth);

    // In a fleet file: a lazy clone next to a copy-on-write one of the same snapshot.
    let fleet = dir.join("fleet.toml");
    std::fs::write(
        &fleet,
        "[[vm]]\nname = \"cow\"\nrestore = \"snap\"\n\n\
         [[vm]]\nname = \"lazy\"\nrestore = \"snap\"\nlazy = true\n",
    )
    .expect("fleet file");
    // Its lazy clone cannot be paged by the VMM as well: one line, nothing started.
    refused_in_one_line(
        &[
            "fleet",
            utf8(&fleet),
            "--machine-mem",
            "256M",
            "--pager",
            "uffd",
        ],
        2,
        "cannot page a lazily restored VM",
    );
    let stats = dir.join("fleet.json");
    let out = run_vmm(&["fleet", utf8(&fleet), "--stats", utf8(&stats)], DEADLINE);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let fleet = read_json(&stats);
    let vms = fleet["vms"].as_array().expect("vms");
    let names: Vec<_> = vms.iter().map(|v| v["name"].clone()).collect();
    assert_eq!(names, ["cow", "lazy"], "in the file's order");
    for vm in vms {
        assert_eq!(common::task_results(vm), truth, "{}", vm["name"]);
    }
    assert_eq!(vms[0]["memory"]["cloned"], true, "{}", vms[0]["memory"]);
    assert!(
        vms[0]["memory"].get("lazy").is_none(),
        "{}",
        vms[0]["memory"]
    );
    assert_eq!(vms[1]["memory"]["cloned"], false, "{}", vms[1]["memory"]);
    assert!(
        vms[1]["memory"]["lazy"]["loaded_pages"].as_u64() > Some(0),
        "{}",
        vms[1]["memory"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lazy_without_restore_is_refused_with_one_line() {
    refused_in_one_line(
        &["--workload", SPEC, "--lazy"],
        1,
        "--lazy goes only with --restore",
    );
    // Pages that come through the lazy loader cannot be paged by the VMM too.
    refused_in_one_line(
        &[
            "--restore",
            "/nonexistent-snapshot",
            "--lazy",
            "--machine-mem",
            "256M",
            "--pager",
            "uffd",
        ],
        2,
        "cannot page a lazily restored VM",
    );
    let dir = scratch("refused");
    let fleet = dir.join("fleet.toml");
    std::fs::write(
        &fleet,
        format!("[[vm]]\nname = \"a\"\nworkload = [\"{SPEC}\"]\nlazy = true\n"),
    )
    .expect("fleet file");
    refused_in_one_line(&["fleet", utf8(&fleet)], 1, "lazy goes only with restore");
    let _ = std::fs::remove_dir_all(&dir);
}
