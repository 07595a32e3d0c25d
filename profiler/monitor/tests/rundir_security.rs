//! The run-directory protocol against a hostile neighbour: planted symlinks, directories others
//! can write, sets planted under a live pid, and the files a killed VMM leaves behind.
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::temp_dir;
use mirrorball_monitor::publish::{PublishSpec, PublishedVm};
use mirrorball_monitor::rundir::{ensure_run_dir, sweep_stale};
use mirrorball_monitor::{scan, VmId};

fn spec(n: u32) -> PublishSpec {
    PublishSpec {
        n,
        tasks: 4,
        guest_ring: 64,
        host_ring: 64,
        ..PublishSpec::default()
    }
}

#[test]
fn a_planted_symlink_never_redirects_what_the_publisher_writes() {
    let dir = temp_dir("symlink");
    let victim = temp_dir("symlink-victim").join("precious");
    fs::write(&victim, b"keep me").expect("victim");
    let me = std::process::id();
    for name in [
        format!("vm-{me}-0.json"),
        format!(".vm-{me}-0.json.tmp"),
        format!("vm-{me}-0.host"),
        format!(".vm-{me}-0.guest.tmp"),
    ] {
        std::os::unix::fs::symlink(&victim, dir.join(name)).expect("plant");
    }
    let vm = PublishedVm::create(&dir, &spec(0)).expect("publish");
    assert_eq!(fs::read(&victim).expect("victim"), b"keep me");
    for ext in ["json", "guest", "host"] {
        let path = dir.join(format!("vm-{me}-0.{ext}"));
        let meta = fs::symlink_metadata(&path).expect("published");
        assert!(meta.file_type().is_file(), "{ext} is a regular file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{ext}");
    }
    drop(vm);
}

#[test]
fn a_run_directory_others_can_write_or_own_is_refused_with_the_fix() {
    let base = temp_dir("perm");
    let open = base.join("open");
    fs::create_dir(&open).expect("dir");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = ensure_run_dir(&open)
        .expect_err("world-writable")
        .to_string();
    assert!(
        e.contains("writable by others") && e.contains("chmod 700"),
        "{e}"
    );
    assert!(PublishedVm::create(&open, &spec(0)).is_err());
    assert_eq!(
        fs::read_dir(&open).expect("dir").count(),
        0,
        "nothing created"
    );

    let file = base.join("file");
    fs::write(&file, b"").expect("file");
    let e = ensure_run_dir(&file).expect_err("a file").to_string();
    assert!(e.contains("not a directory"), "{e}");

    // Not ours: `/` belongs to root (skipped when the tests run as root).
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let e = ensure_run_dir(std::path::Path::new("/"))
            .expect_err("root's")
            .to_string();
        assert!(e.contains("not you"), "{e}");
    }

    let fresh = base.join("a/b/run");
    ensure_run_dir(&fresh).expect("created");
    let mode = fs::metadata(&fresh).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn a_set_planted_under_a_live_pid_is_stale_and_swept_with_a_killed_vmms_leftovers() {
    let dir = temp_dir("planted");
    let src_dir = temp_dir("planted-src");
    let src = PublishedVm::create(&src_dir, &spec(0)).expect("source");
    // Valid regions, named after pid 1 (alive) and after this process (alive), but held by no
    // VMM: what a planted set or a SIGKILLed VMM's leftovers look like.
    for (pid, n) in [(1, 0), (std::process::id(), 7)] {
        for (ext, path) in [("guest", src.guest_path()), ("host", src.host_path())] {
            fs::copy(&path, dir.join(format!("vm-{pid}-{n}.{ext}"))).expect("copy");
        }
    }
    fs::write(dir.join(".vm-999999999-0.host.tmp"), b"half").expect("tmp");
    let found = scan(&dir).expect("scan");
    assert!(found.live.is_empty(), "{:?}", found.live);
    assert_eq!(found.stale.len(), 2);
    assert!(found
        .stale
        .iter()
        .any(|s| s.id == VmId { pid: 1, n: 0 } && s.reason.contains("no running VMM")));
    // The next publisher removes them.
    let vm = PublishedVm::create(&dir, &spec(1)).expect("publish");
    let left: Vec<String> = fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 3, "only the new VM's files: {left:?}");
    assert_eq!(scan(&dir).expect("scan").live.len(), 1);
    assert_eq!(sweep_stale(&dir), 0, "a live VM is never swept");
    drop(vm);
    drop(src);
}
