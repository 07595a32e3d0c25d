//! Discovery and opening: stale sets, garbage, truncated and wrong-kind files, special files —
//! all reported or refused, never a panic or a hang.
mod common;

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{temp_dir, Rng};
use mirrorball_monitor::publish::{PublishSpec, PublishedVm};
use mirrorball_monitor::{discover, scan, VmHandle, VmId, VmStatus};

fn spec(n: u32) -> PublishSpec {
    PublishSpec {
        n,
        name: format!("vm{n}"),
        vcpus: 2,
        tasks: 8,
        guest_ring: 256,
        host_ring: 256,
        ..PublishSpec::default()
    }
}

fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait");
    pid
}

fn name(pid: u32, n: u32, ext: &str) -> String {
    format!("vm-{pid}-{n}.{ext}")
}

#[test]
fn discovery_ignores_stale_and_garbage_without_panicking() {
    let dir = temp_dir("discovery");
    let me = std::process::id();
    let live = PublishedVm::create(&dir, &spec(0)).expect("publish");
    let dead = dead_pid();
    let _stale = PublishedVm::create_as(&dir, dead, &spec(0)).expect("publish stale");

    // Valid region files to copy and damage.
    let src_dir = temp_dir("discovery-src");
    let src = PublishedVm::create(&src_dir, &spec(9)).expect("publish source");
    let src_guest = src_dir.join(name(me, 9, "guest"));
    let src_host = src_dir.join(name(me, 9, "host"));
    let put =
        |n: u32, ext: &str, bytes: &[u8]| fs::write(dir.join(name(me, n, ext)), bytes).unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let random: Vec<u8> = (0..65536).map(|_| (rng.next() & 0xff) as u8).collect();

    // 1: random bytes.
    put(1, "guest", &random);
    put(1, "host", &random[..4096]);
    // 2: truncated copies (shorter than their region_size; shorter than a header).
    let guest_bytes = fs::read(&src_guest).unwrap();
    let host_bytes = fs::read(&src_host).unwrap();
    put(2, "guest", &guest_bytes[..guest_bytes.len() / 2]);
    put(2, "host", &host_bytes);
    put(11, "guest", &guest_bytes);
    put(11, "host", &host_bytes[..100]);
    // 3: swapped kinds (wrong magic for each).
    put(3, "guest", &host_bytes);
    put(3, "host", &guest_bytes);
    // 4: empty files.
    put(4, "guest", b"");
    put(4, "host", b"");
    // 5: a directory and a FIFO.
    fs::create_dir(dir.join(name(me, 5, "guest"))).unwrap();
    let fifo = std::ffi::CString::new(dir.join(name(me, 5, "host")).to_str().unwrap()).unwrap();
    // SAFETY: creates a FIFO at a path we own.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // 6: symlinks to valid regions (refused: O_NOFOLLOW).
    std::os::unix::fs::symlink(&src_guest, dir.join(name(me, 6, "guest"))).unwrap();
    std::os::unix::fs::symlink(&src_host, dir.join(name(me, 6, "host"))).unwrap();
    // 7: a guest region without its host region.
    put(7, "guest", &guest_bytes);
    // 8: valid regions with garbage metadata.
    put(8, "guest", &guest_bytes);
    put(8, "host", &host_bytes);
    put(8, "json", &random[..300]);
    // 10: valid regions, metadata that names another VM.
    put(10, "guest", &guest_bytes);
    put(10, "host", &host_bytes);
    put(10, "json", br#"{"pid":1,"vm":2,"name":"liar"}"#);
    // Names that are not ours.
    for odd in [
        "vm-abc.guest",
        "vm-1-2-3.guest",
        "vm-.host",
        "vm-99999999999-0.guest",
        "vm-1-1",
    ] {
        fs::write(dir.join(odd), b"x").unwrap();
    }
    fs::write(dir.join("unrelated.txt"), b"x").unwrap();
    drop(src);

    let started = Instant::now();
    let s = scan(&dir).expect("scan");
    // Only the set whose VMM holds its host region's lock is live: copies of valid regions
    // under a live pid (8, 10) are not.
    let live_ids: Vec<u32> = s.live.iter().map(|h| h.id.n).collect();
    assert_eq!(live_ids, vec![0]);
    assert!(s.live.iter().all(|h| h.id.pid == me));
    let stale: Vec<(VmId, &str)> = s
        .stale
        .iter()
        .map(|st| (st.id, st.reason.as_str()))
        .collect();
    assert_eq!(stale.len(), 11, "{stale:?}");
    assert!(stale.contains(&(
        VmId { pid: dead, n: 0 },
        format!("process {dead} is not running").as_str()
    )));
    assert!(stale
        .iter()
        .any(|(id, why)| id.n == 7 && why.contains("host region")));
    for n in [1, 2, 3, 4, 5, 6, 8, 10, 11] {
        assert!(
            stale
                .iter()
                .any(|(id, why)| id.n == n && why.contains("no running VMM holds")),
            "{n}: {stale:?}"
        );
    }
    assert_eq!(s.ignored.len(), 5, "{:?}", s.ignored);

    // Opening them anyway (as `vmm record --vm` names one) still refuses the garbage.
    let handles: Vec<VmHandle> = [0, 1, 2, 3, 4, 5, 6, 8, 10, 11]
        .into_iter()
        .map(|n| VmHandle::new(&dir, VmId { pid: me, n }))
        .collect();
    for h in &handles {
        let result = h.open();
        match h.id.n {
            2 => {
                // A guest region the guest broke does not hide the VM's (valid) host region.
                let vm = result.expect("opens from its host region");
                let e = vm.guest_error().expect("guest error");
                assert!(e.contains("bad region size"), "{e}");
            }
            0 | 8 | 10 => {
                let vm = result.unwrap_or_else(|e| panic!("VM {} should open: {e}", h.id));
                assert_eq!(vm.vcpu_count(), 2);
                if h.id.n == 0 {
                    assert_eq!(vm.status(), VmStatus::Running);
                } else {
                    assert!(
                        matches!(vm.status(), VmStatus::Ended(why) if why.contains("no VMM")),
                        "{:?}",
                        vm.status()
                    );
                }
            }
            n => {
                let e = result.expect_err("garbage must not open").to_string();
                eprintln!("vm {n}: {e}");
                let expected = match n {
                    1 | 3 => "bad magic",
                    4 | 11 => "too small",
                    5 => "not a regular file",
                    6 => "symbolic links",
                    _ => "",
                };
                assert!(
                    e.to_lowercase().contains(&expected.to_lowercase()),
                    "vm {n}: {e}"
                );
            }
        }
    }
    let h8 = handles.iter().find(|h| h.id.n == 8).unwrap();
    assert!(h8.meta.is_none() && h8.meta_error.is_some());
    assert_eq!(h8.name(), format!("vm-{me}-8"));
    let h10 = handles.iter().find(|h| h.id.n == 10).unwrap();
    assert!(h10.meta_error.as_ref().unwrap().contains("names VM 1-2"));
    let h0 = s.live.iter().find(|h| h.id.n == 0).unwrap();
    assert_eq!(h0.name(), "vm0");
    assert!(started.elapsed() < Duration::from_secs(10));

    assert_eq!(discover(&dir).len(), 1);
    assert!(discover(&dir.join("missing")).is_empty());
    assert!(discover(Path::new("/proc/self/status")).is_empty());
    drop(live);
    assert!(!discover(&dir).iter().any(|h| h.id.n == 0));
}

#[test]
fn a_file_that_shrinks_is_noticed_before_it_is_read() {
    let dir = temp_dir("shrink");
    let vm = PublishedVm::create(&dir, &spec(0)).expect("publish");
    let handle = VmHandle::new(&dir, vm.id());
    let mut open = handle.open().expect("open");
    open.poll().expect("poll");
    let f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(handle.guest_path())
        .unwrap();
    f.set_len(4096).unwrap();
    let e = open.poll().expect_err("shrunk file").to_string();
    assert!(e.contains("shrank"), "{e}");
    assert!(matches!(open.status(), VmStatus::Ended(why) if why.contains("shrank")));
    drop(open);
    drop(vm);
}

#[test]
fn removed_files_end_the_vm_but_stay_readable() {
    let dir = temp_dir("removed");
    let vm = PublishedVm::create(&dir, &spec(0)).expect("publish");
    let mut open = VmHandle::new(&dir, vm.id()).open().expect("open");
    {
        let g = vm.guest().unwrap();
        let mut w = g.ring_writer().unwrap();
        w.push(&mirrorball_profiler_abi::GuestSample::default());
    }
    vm.unpublish();
    assert!(matches!(open.status(), VmStatus::Ended(why) if why.contains("removed")));
    let b = open.poll().expect("drain after removal");
    assert_eq!(b.guest.len(), 1);
}
