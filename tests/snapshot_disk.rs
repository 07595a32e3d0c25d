//! Snapshots of a Linux VM with a copy-on-write disk (issue 11 with issue 10's disk), on KVM:
//! the reference kernel mounts an ext2 base image read-write as its root (which writes the
//! superblock into its overlay), is snapshotted at the mount's console line, and two clones
//! restored from the snapshot go on from there — the kernel then looks for an init on the disk
//! through the restored virtio-blk queue, finds none and reboots — while the snapshot holds the
//! superblock write and the base image is never written. A snapshot whose overlay is corrupted
//! or truncated, or whose base image has changed or is missing, is refused with one line and
//! exit code 22 before anything is created. (User space on the disk, and clones writing files of
//! their own, are checked in the nested-SVM test bed: `snapdisk`.)
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{
    ext2_image, kvm_available, le16, reference_guest, run_vmm, skip_or_fail, temp_file, text,
    EXT2_S_MNT_COUNT,
};

const DEADLINE: Duration = Duration::from_secs(900);
const MOUNTED: &str = "VFS: Mounted root (ext2 filesystem) on device";

/// `vmm --restore snap --vms 2` with its logs in `logs` and its stats in `stats` (and `extra`
/// arguments), killed after `deadline`.
fn restore_two(
    snap: &Path,
    logs: &Path,
    stats: &Path,
    extra: &[&str],
    deadline: Duration,
) -> std::process::Output {
    let mut args = vec![
        "--restore",
        snap.to_str().expect("utf-8"),
        "--vms",
        "2",
        "--log-dir",
        logs.to_str().expect("utf-8"),
        "--stats",
        stats.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    run_vmm(&args, deadline)
}

/// `vmm --restore snap` with logs and stats in `dir`: refused with exit code 22, one line
/// containing `expect`, and neither file nor directory created.
fn refused(dir: &Path, snap: &Path, expect: &str) {
    let (logs, stats) = (dir.join("bad-logs"), dir.join("bad-stats.json"));
    let out = restore_two(snap, &logs, &stats, &[], Duration::from_secs(60));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(22), "{expect}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(expect), "expected {expect:?}: {err}");
    assert!(!logs.exists() && !stats.exists(), "left behind: {err}");
    // A fleet file that restores it: the same code and reason, refused before anything runs.
    let fleet = dir.join("bad-fleet.toml");
    std::fs::write(
        &fleet,
        format!("[[vm]]\nname = \"c\"\nrestore = {snap:?}\n"),
    )
    .expect("fleet");
    let out = run_vmm(
        &["fleet", fleet.to_str().expect("utf-8")],
        Duration::from_secs(60),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(22), "fleet, {expect}: {err}");
    assert!(err.contains(expect), "fleet: expected {expect:?}: {err}");
}

#[test]
fn a_disk_vm_snapshotted_after_its_root_mount_restores_as_clones() {
    let name = "a_disk_vm_snapshotted_after_its_root_mount_restores_as_clones";
    if !kvm_available(name) {
        return;
    }
    let kernel = match reference_guest() {
        Ok((kernel, _)) => {
            let vmlinux = kernel.with_file_name("vmlinux");
            if vmlinux.exists() {
                vmlinux
            } else {
                kernel
            }
        }
        Err(why) => return skip_or_fail(name, &format!("no reference guest ({why})")),
    };
    let marker = temp_file("snapshot_disk", "marker", b"");
    let dir = marker.parent().expect("dir").to_path_buf();
    // An 8 MiB image of 4 KiB blocks.
    let image = match ext2_image(&dir, "base.ext2", 4096, None) {
        Ok(image) => image,
        Err(why) => return skip_or_fail(name, &why),
    };
    let before = std::fs::read(&image).expect("read image");
    let snap = dir.join("snap");
    let overlay = dir.join("template.ov");
    let disk = format!("{},overlay={}", image.display(), overlay.display());
    let out = run_vmm(
        &[
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 root=/dev/vda rw",
            "--disk",
            &disk,
            "--snapshot-on",
            MOUNTED,
            snap.to_str().expect("utf-8"),
            "--timeout",
            "600",
        ],
        DEADLINE,
    );
    let (console, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "template: {stderr}\n{console}");
    assert!(stderr.contains("snapshot in"), "{stderr}");
    // The snapshot's line says how many blocks the disk's overlay held (the state file's count).
    let said = stderr
        .split("disk overlay: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no disk figure in: {stderr}"));
    assert!(console.contains(MOUNTED), "{console}");

    // The snapshot holds the template's superblock write; the base is untouched.
    let saved = std::fs::read(snap.join("disk-overlay.bin")).expect("disk-overlay.bin");
    let mode = std::fs::metadata(snap.join("disk-overlay.bin"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(saved.len(), before.len());
    assert_eq!(le16(&before, EXT2_S_MNT_COUNT), 0);
    assert_eq!(
        le16(&saved, EXT2_S_MNT_COUNT),
        1,
        "the mount's superblock write"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("state.json")).expect("state"))
            .expect("json");
    assert_eq!(state["version"], 3);
    assert_eq!(
        state["disk"]["overlay"]["blocks"], said,
        "{}",
        state["disk"]
    );
    assert!(said >= 1, "the superblock write is held");
    assert_eq!(
        state["disk"]["overlay"]["runs"][0][0], 0,
        "{}",
        state["disk"]
    );
    assert!(state["devices"]["blk"]["transport"]["queues"][0]["ready"] == true);
    assert_eq!(std::fs::read(&image).expect("read image"), before);
    // Clones need neither the template's overlay file nor anything of the template but the
    // snapshot and the base.
    std::fs::remove_file(&overlay).expect("remove the template's overlay");

    let (logs, stats) = (dir.join("logs"), dir.join("stats.json"));
    let out = restore_two(&snap, &logs, &stats, &["--timeout", "600"], DEADLINE);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "clones: {stderr}");
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats).expect("stats")).expect("json");
    for vm in ["vm0", "vm1"] {
        let log = std::fs::read(logs.join(format!("{vm}.log"))).map_or(String::new(), |b| text(&b));
        assert!(
            log.contains("No working init found"),
            "{vm}: {log}\n{stderr}"
        );
        assert!(
            !log.contains("Linux version"),
            "{vm} replayed the boot: {log}"
        );
    }
    let vms = stats["vms"].as_array().expect("vms");
    for vm in vms {
        let disk = &vm["disk"];
        eprintln!("{}: disk {disk}", vm["name"]);
        assert!(
            disk["reads"].as_u64().unwrap_or(0) > 0,
            "the clone read its disk: {disk}"
        );
        assert_eq!(disk["malformed"].as_u64(), Some(0), "{disk}");
        assert_eq!(disk["io_errors"].as_u64(), Some(0), "{disk}");
    }
    assert_eq!(std::fs::read(&image).expect("read image"), before);
    assert_eq!(
        std::fs::read(snap.join("disk-overlay.bin")).expect("overlay"),
        saved,
        "clones never write the snapshot"
    );

    // Bad input: each case in a copy of the snapshot (its big memory file linked, not copied).
    let copy = |tag: &str| {
        let to = dir.join(tag);
        std::fs::create_dir_all(&to).expect("mkdir");
        for e in std::fs::read_dir(&snap).expect("read_dir").flatten() {
            let target = to.join(e.file_name());
            if e.file_name() == "disk-overlay.bin" {
                std::fs::copy(e.path(), target).expect("copy");
            } else {
                std::fs::hard_link(e.path(), target).expect("link");
            }
        }
        to
    };
    let t = copy("corrupt");
    let mut bytes = saved.clone();
    bytes[EXT2_S_MNT_COUNT] ^= 0xff;
    std::fs::write(t.join("disk-overlay.bin"), &bytes).expect("write");
    refused(
        &dir,
        &t,
        "disk-overlay.bin: the overlay file does not match its checksum",
    );
    let t = copy("truncated");
    std::fs::write(t.join("disk-overlay.bin"), &saved[..4096]).expect("write");
    refused(&dir, &t, "(truncated?)");
    let f = std::fs::File::options()
        .write(true)
        .open(&image)
        .expect("open base");
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .expect("set mtime");
    drop(f);
    refused(
        &dir,
        &snap,
        "has changed since the snapshot (modification time differs)",
    );
    std::fs::remove_file(&image).expect("remove base");
    refused(&dir, &snap, "cannot be opened");
    let _ = std::fs::remove_dir_all(&dir);
}
