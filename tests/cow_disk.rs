//! The copy-on-write disk (`--disk`) end to end: bad disk arguments give one line and exit code
//! 1 before any VM starts; the reference kernel finds the virtio-blk device at boot and mounts a
//! read-only ext2 root file system from it (made here with `mke2fs -d`), and the base image is
//! left unchanged.
//!
//! On a PVM host user space cannot run: with no initramfs the kernel mounts the root file system,
//! finds no init, panics and (`panic=1 reboot=k`) resets, which ends the VM with exit code 0.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    ext2_image, le16, reference_linux, run_vmm, run_vmm_text, skip_or_fail, temp_file, text,
    EXT2_S_MAX_MNT_COUNT, EXT2_S_MNT_COUNT,
};

/// `vmm args` fails before any VM starts: exit code 1, one line that holds `expected`.
fn one_line_error(args: &[&str], expected: &str) {
    common::assert_one_line_error(args, 1, &[expected]);
}

#[test]
fn bad_disk_arguments_are_one_line_errors() {
    let odd = temp_file("cow_disk_args", "odd.img", &[0u8; 1000]);
    let good = temp_file("cow_disk_args", "good.img", &[0u8; 4096]);
    let taken = temp_file("cow_disk_args", "taken", b"x");
    let dir = odd.parent().expect("dir").to_path_buf();
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    let missing = s(&dir.join("missing.img"));
    one_line_error(
        &["--kernel", "/nonexistent", "--disk", &missing],
        "cannot open base image",
    );
    one_line_error(
        &["--kernel", "/nonexistent", "--disk", &s(&odd)],
        "not a non-zero multiple of 512",
    );
    let with_overlay = format!("{},overlay={}", s(&good), s(&taken));
    one_line_error(
        &["--kernel", "/nonexistent", "--disk", &with_overlay],
        "already exists",
    );
    // For a fleet, each VM's overlay is PATH.NAME: vm1's is taken.
    let fleet_taken = dir.join("fleet.vm1");
    std::fs::write(&fleet_taken, b"x").expect("write");
    let fleet = format!("{},overlay={}", s(&good), s(&dir.join("fleet")));
    one_line_error(
        &["--kernel", "/nonexistent", "--vms", "2", "--disk", &fleet],
        "fleet.vm1 already exists",
    );
    one_line_error(
        &[
            "--kernel",
            "/nonexistent",
            "--disk",
            &format!("{},cache=no", s(&good)),
        ],
        "unknown or repeated option",
    );
    one_line_error(
        &[
            "--kernel",
            "/nonexistent",
            "--disk",
            &format!("{},map=maybe", s(&good)),
        ],
        "expected overlay=PATH or map=on|off",
    );
    // --disk is for Linux guests.
    let out = run_vmm(&["--disk", &s(&good)], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&good).expect("read"), vec![0u8; 4096]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 2 MiB ext2 image holding one file, or why none could be made.
fn ext2_image_with_motd(dir: &Path) -> Result<PathBuf, String> {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/motd"), b"mirrorball cow disk\n").map_err(|e| e.to_string())?;
    ext2_image(dir, "root.ext2", 1024, Some(&root))
}

/// What a Linux test of the disk needs: (kernel, a stats path in a scratch directory, that
/// directory, the base image `make_image` made there, its bytes before the run); `None` after
/// skipping (or failing, under CI) `test` when the kernel or the image cannot be had.
fn prepare_disk_boot(
    test: &str,
    make_image: fn(&Path) -> Result<PathBuf, String>,
) -> Option<(PathBuf, PathBuf, PathBuf, PathBuf, Vec<u8>)> {
    let (kernel, _) = reference_linux(test)?;
    let stats = temp_file(test, "stats.json", b"");
    let dir = stats.parent().expect("dir").to_path_buf();
    let image = match make_image(&dir) {
        Ok(image) => image,
        Err(why) => {
            skip_or_fail(test, &why);
            return None;
        }
    };
    let before = std::fs::read(&image).expect("read image");
    Some((kernel, stats, dir, image, before))
}

#[test]
fn reference_kernel_mounts_a_read_only_root_from_the_cow_disk() {
    let test = "reference_kernel_mounts_a_read_only_root_from_the_cow_disk";
    let Some((kernel, stats, dir, image, before)) = prepare_disk_boot(test, ext2_image_with_motd)
    else {
        return;
    };
    let run = run_vmm_text(
        &[
            "--stats",
            stats.to_str().expect("utf-8"),
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro",
            "--disk",
            image.to_str().expect("utf-8"),
            "--timeout",
            "600",
        ],
        Duration::from_secs(660),
    );
    run.assert_console_has(
        "[vda] 4096 512-byte logical blocks",
        "the kernel did not find the disk",
    );
    run.assert_console_has(
        "VFS: Mounted root (ext2 filesystem) readonly",
        "no root mount",
    );
    run.assert_success();
    let stats = common::read_json(&stats);
    let disk = &stats["disk"];
    assert!(disk["reads"].as_u64().unwrap_or(0) > 0, "{disk}");
    assert_eq!(disk["malformed"].as_u64(), Some(0), "{disk}");
    assert_eq!(disk["io_errors"].as_u64(), Some(0), "{disk}");
    assert_eq!(std::fs::read(&image).expect("read image"), before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An 8 MiB ext2 image of 4 KiB blocks, never mounted (`s_mnt_count` 0) and due for a check
/// after one mount (`s_max_mnt_count` 1): a read-write mount writes `s_mnt_count` 1 into the
/// superblock, and a kernel that mounts a superblock already holding 1 warns "maximal mount
/// count reached".
fn ext2_image_counting_mounts(dir: &Path) -> Result<PathBuf, String> {
    let image = ext2_image(dir, "shared.ext2", 4096, None)?;
    let mut bytes = std::fs::read(&image).map_err(|e| e.to_string())?;
    bytes[EXT2_S_MNT_COUNT..EXT2_S_MNT_COUNT + 2].copy_from_slice(&0u16.to_le_bytes());
    bytes[EXT2_S_MAX_MNT_COUNT..EXT2_S_MAX_MNT_COUNT + 2].copy_from_slice(&1u16.to_le_bytes());
    std::fs::write(&image, bytes).map_err(|e| e.to_string())?;
    Ok(image)
}

/// Runs `vmm ctl VM CMD` against `run_dir`; panics unless it succeeds.
fn ctl(run_dir: &Path, vm: &str, cmd: &str) {
    let out = Command::new(common::vmm_bin())
        .args(["ctl", vm, cmd, "--run-dir"])
        .arg(run_dir)
        .output()
        .expect("vmm ctl");
    assert_eq!(
        out.status.code(),
        Some(0),
        "ctl {vm} {cmd}: {}",
        text(&out.stderr)
    );
}

/// Waits until `path` contains `needle` or `child` ends; whether it appeared.
fn wait_for_line(path: &Path, needle: &str, child: &mut std::process::Child) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(600) {
        if std::fs::read(path).is_ok_and(|b| text(&b).contains(needle)) {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Two Linux VMs of one fleet (a fleet file with a `disk` entry, so each VM gets an overlay file
/// of its own) mount one ext2 base image read-write. VM b is paused until VM a has mounted, so a's
/// superblock write (mount count 0 → 1) happens before b reads the superblock. b must still see
/// the base's count (no "maximal mount count" warning, and b writes 1, not 2), the base image is
/// unchanged, and each overlay holds its own VM's superblock write. Both disks map base pages
/// (`map=on`): the superblock's block is mapped into each guest's page cache, which the guest
/// then writes (a copy-on-write break under KVM) before writing it to its overlay.
#[test]
fn overlays_isolate_the_vms_of_a_fleet() {
    let test = "overlays_isolate_the_vms_of_a_fleet";
    let Some((kernel, stats, dir, image, before)) =
        prepare_disk_boot(test, ext2_image_counting_mounts)
    else {
        return;
    };
    let fleet = dir.join("fleet.toml");
    std::fs::write(
        &fleet,
        format!(
            "[defaults]\ndisk = \"shared.ext2,overlay=ov,map=on\"\n\
             [[vm]]\nname = \"a\"\nkernel = \"{k}\"\ncmdline = \"{c}\"\n\
             [[vm]]\nname = \"b\"\nkernel = \"{k}\"\ncmdline = \"{c}\"\n",
            k = kernel.display(),
            c = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw",
        ),
    )
    .expect("fleet file");
    let run_dir = dir.join("run");
    let logs = dir.join("logs");
    let mut child = Command::new(common::vmm_bin())
        .arg("fleet")
        .arg(&fleet)
        .arg("--stats")
        .arg(&stats)
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--log-dir")
        .arg(&logs)
        .args(["--timeout", "900"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    // The control sockets appear within milliseconds; the kernels need a minute to mount.
    let start = std::time::Instant::now();
    while std::fs::read_dir(&run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "ctl"))
        .count()
        < 2
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no control sockets"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ctl(&run_dir, "b", "pause");
    let mounted = "VFS: Mounted root (ext2 filesystem) on device";
    let a_mounted = wait_for_line(&logs.join("a.log"), mounted, &mut child);
    ctl(&run_dir, "b", "resume");
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let log = |vm: &str| text(&std::fs::read(logs.join(format!("{vm}.log"))).unwrap_or_default());
    let context = || {
        format!(
            "--- a.log ---\n{}\n--- b.log ---\n{}\n--- stderr ---\n{stderr}",
            log("a"),
            log("b")
        )
    };
    assert!(a_mounted, "vm a did not mount its root:\n{}", context());
    assert!(
        log("b").contains(mounted),
        "vm b did not mount:\n{}",
        context()
    );
    for vm in ["a", "b"] {
        assert!(
            !log(vm).contains("maximal mount count reached"),
            "vm {vm} saw another VM's mount:\n{}",
            context()
        );
    }
    assert_eq!(status.code(), Some(0), "{}", context());
    assert_eq!(
        std::fs::read(&image).expect("image"),
        before,
        "base changed"
    );
    for vm in ["a", "b"] {
        let overlay = std::fs::read(dir.join(format!("ov.{vm}"))).expect("overlay");
        assert_eq!(overlay.len(), before.len());
        assert_eq!(
            le16(&overlay, EXT2_S_MNT_COUNT),
            1,
            "vm {vm}'s overlay holds its own first mount"
        );
    }
    let stats = common::read_json(&stats);
    for vm in stats["vms"].as_array().expect("vms") {
        let disk = &vm["disk"];
        assert!(disk["writes"].as_u64().unwrap_or(0) > 0, "{vm}");
        assert!(disk["overlay_blocks"].as_u64().unwrap_or(0) > 0, "{vm}");
        assert!(disk["mapped_pages"].as_u64().unwrap_or(0) > 0, "{vm}");
        assert_eq!(disk["malformed"].as_u64(), Some(0), "{vm}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
