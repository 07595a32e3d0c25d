use std::fs::FileTimes;
use std::path::PathBuf;

use super::*;
use mirrorball_devices::virtio_blk::disk::OverlaySpec;

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mb-snapdisk-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("snap")).unwrap();
    dir
}

/// A 3 MiB base (so its first and last MiB do not cover it all), a disk over it with two
/// blocks written, saved into `dir/snap`.
fn saved(dir: &Path) -> (PathBuf, DiskSnapshot) {
    let path = dir.join("base.img");
    std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
    let mut disk = CowDisk::new(BaseImage::open(&path).unwrap(), &OverlaySpec::Memory).unwrap();
    disk.write(4096, &[1; 4096]).unwrap();
    disk.write((2 << 20) + 512, &[2; 512]).unwrap();
    let d = save(&dir.join("snap"), &disk, false).unwrap();
    (path, d)
}

#[test]
fn a_saved_disk_restores_over_the_same_base() {
    let dir = tempdir("ok");
    let (path, d) = saved(&dir);
    validate(&d).unwrap();
    assert_eq!(d.base.path, std::fs::canonicalize(&path).unwrap());
    assert_eq!(d.base.bytes, 3 << 20);
    assert_eq!(d.overlay.runs, vec![[1, 1], [512, 1]]);
    let file = dir.join("snap").join(DISK_OVERLAY_FILE);
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "sparse: {} blocks",
        meta.blocks()
    );
    let spec = spec(&dir.join("snap"), &d).unwrap();
    let layer = spec.layer.clone().expect("the snapshot's layer");
    assert_eq!(layer.blocks(), 2);
    let clone = CowDisk::layered(spec.base.clone(), layer, &OverlaySpec::Memory).unwrap();
    let mut buf = vec![0u8; 8192];
    clone.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &[7; 4096][..]);
    assert_eq!(&buf[4096..], &[1; 4096][..]);
    // Saving again into the same directory is refused (O_EXCL), the file left as it was.
    let disk = CowDisk::new(spec.base, &OverlaySpec::Memory).unwrap();
    let e = save(&dir.join("snap"), &disk, false).expect_err("exists");
    assert!(e.contains("cannot create disk-overlay.bin"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_or_changed_base_is_refused_in_one_line() {
    let dir = tempdir("base");
    let (path, d) = saved(&dir);
    let one_line = |e: String| {
        assert!(!e.contains('\n'), "{e}");
        e
    };
    // The same bytes in a new file: another inode and modification time.
    let copy = dir.join("copy.img");
    std::fs::copy(&path, &copy).unwrap();
    std::fs::rename(&copy, &path).unwrap();
    let e = one_line(spec(&dir.join("snap"), &d).expect_err("replaced"));
    assert!(e.contains("has changed since the snapshot"), "{e}");
    assert!(e.contains("inode"), "{e}");
    // A byte changed in place in the last MiB, the modification time put back.
    let (path, d) = {
        std::fs::remove_dir_all(dir.join("snap")).unwrap();
        std::fs::create_dir_all(dir.join("snap")).unwrap();
        saved(&dir)
    };
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[9], (3 << 20) - 10).unwrap();
    f.set_times(FileTimes::new().set_modified(mtime)).unwrap();
    drop(f);
    let e = one_line(spec(&dir.join("snap"), &d).expect_err("edited"));
    assert_eq!(
        e,
        format!(
            "the disk's base image {} has changed since the snapshot (first/last MiB differs)",
            d.base.path.display()
        )
    );
    // Grown.
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.set_len((3 << 20) + 512).unwrap();
    let e = one_line(spec(&dir.join("snap"), &d).expect_err("grown"));
    assert!(e.contains("size"), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = one_line(spec(&dir.join("snap"), &d).expect_err("missing"));
    assert_eq!(
        e,
        format!(
            "the disk's base image {} cannot be opened: No such file or directory (os error 2)",
            d.base.path.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_truncated_or_corrupted_overlay_is_refused_in_one_line() {
    let dir = tempdir("overlay");
    let (_, d) = saved(&dir);
    let snap = dir.join("snap");
    let file = snap.join(DISK_OVERLAY_FILE);
    let bytes = std::fs::read(&file).unwrap();
    let mut bad = bytes.clone();
    bad[4096 + 3] = 0;
    std::fs::write(&file, &bad).unwrap();
    let e = open_layer(&snap, &d).expect_err("corrupted").to_string();
    assert!(
        e.ends_with("does not match its checksum (corrupted)"),
        "{e}"
    );
    std::fs::write(&file, &bytes[..8192]).unwrap();
    let e = open_layer(&snap, &d).expect_err("truncated").to_string();
    assert!(e.contains("truncated"), "{e}");
    std::fs::remove_file(&file).unwrap();
    let e = open_layer(&snap, &d).expect_err("missing").to_string();
    assert!(e.contains("cannot open disk-overlay.bin"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let mut odd = d.clone();
    odd.overlay.file = "../x".into();
    assert!(validate(&odd).is_err());
    let mut odd = d;
    odd.overlay.bytes += 512;
    assert!(validate(&odd).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
