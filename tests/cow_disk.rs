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

use common::{kvm_available, reference_guest, run_vmm, skip_or_fail, temp_file, text};

fn one_line_error(args: &[&str], expected: &str) {
    let out = run_vmm(args, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
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
    // --disk is for Linux guests.
    let out = run_vmm(&["--disk", &s(&good)], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&good).expect("read"), vec![0u8; 4096]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 2 MiB ext2 image holding one file, or why none could be made.
fn ext2_image(dir: &Path) -> Result<PathBuf, String> {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/motd"), b"mirrorball cow disk\n").map_err(|e| e.to_string())?;
    let image = dir.join("root.ext2");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext2", "-b", "1024", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("2048")
        .output()
        .map_err(|e| format!("cannot run mke2fs (install e2fsprogs): {e}"))?;
    if !out.status.success() {
        return Err(format!("mke2fs failed: {}", text(&out.stderr)));
    }
    Ok(image)
}

#[test]
fn reference_kernel_mounts_a_read_only_root_from_the_cow_disk() {
    let name = "reference_kernel_mounts_a_read_only_root_from_the_cow_disk";
    if !kvm_available(name) {
        return;
    }
    let (kernel, _) = match reference_guest() {
        Ok(guest) => guest,
        Err(why) => return skip_or_fail(name, &format!("no reference guest ({why})")),
    };
    let vmlinux = kernel.with_file_name("vmlinux");
    let kernel = if vmlinux.exists() { vmlinux } else { kernel };
    let stats = temp_file("cow_disk_boot", "stats.json", b"");
    let dir = stats.parent().expect("dir").to_path_buf();
    let image = match ext2_image(&dir) {
        Ok(image) => image,
        Err(why) => return skip_or_fail(name, &why),
    };
    let before = std::fs::read(&image).expect("read image");
    let out = run_vmm(
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
    let console = text(&out.stdout);
    let stderr = text(&out.stderr);
    let context = || format!("--- console ---\n{console}\n--- stderr ---\n{stderr}");
    assert!(
        console.contains("[vda] 4096 512-byte logical blocks"),
        "the kernel did not find the disk:\n{}",
        context()
    );
    assert!(
        console.contains("VFS: Mounted root (ext2 filesystem) readonly"),
        "no root mount:\n{}",
        context()
    );
    assert_eq!(out.status.code(), Some(0), "{}", context());
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats).expect("stats")).expect("json");
    let disk = &stats["disk"];
    assert!(disk["reads"].as_u64().unwrap_or(0) > 0, "{disk}");
    assert_eq!(disk["malformed"].as_u64(), Some(0), "{disk}");
    assert_eq!(disk["io_errors"].as_u64(), Some(0), "{disk}");
    assert_eq!(std::fs::read(&image).expect("read image"), before);
    let _ = std::fs::remove_dir_all(&dir);
}
