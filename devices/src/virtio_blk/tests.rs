//! The virtio-blk device's saved state: a device restored from it (over the snapshot's disk
//! layer) goes on where the saved one stopped.
use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use super::disk::{BaseImage, CowDisk, OverlaySpec};
use super::layer::{write_layer, SnapshotLayer};
use super::request::VIRTIO_BLK_T_OUT;
use super::test_driver::{TestDriver, DATA, F_NEXT, F_WRITE};
use crate::virtio_mmio::{regs, status};
use vm_memory::{Bytes, GuestAddress};

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mb-blkstate-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_restored_device_goes_on_with_the_ring_and_the_disk_where_they_were() {
    let dir = tempdir("round");
    let path = dir.join("base.img");
    std::fs::write(&path, vec![0x11u8; 64 << 10]).unwrap();
    let base = BaseImage::open(&path).unwrap();
    let mut a = TestDriver::new(CowDisk::new(base.clone(), &OverlaySpec::Memory).unwrap());
    assert_eq!(a.write_disk(8, &[0xab; 4096]), 0);
    assert_eq!(a.read_disk(8, 512).unwrap(), vec![0xab; 512]);
    // A write the driver made available but did not notify yet: in the ring at the snapshot.
    let pending = DATA + 0x8000;
    a.write_header(DATA + 0x100, VIRTIO_BLK_T_OUT, 16);
    a.mem
        .write_slice(&[0xcd; 512], GuestAddress(pending))
        .unwrap();
    for (i, d) in [
        (DATA + 0x100, 16, F_NEXT, 11),
        (pending, 512, F_NEXT, 12),
        (DATA + 0x200, 1, F_WRITE, 0),
    ]
    .into_iter()
    .enumerate()
    {
        a.write_desc(
            super::test_driver::DESC_TABLE,
            10 + u16::try_from(i).unwrap(),
            d,
        );
    }
    a.make_available(&[10]);
    let saved = a.dev.blk_state();
    assert_eq!(saved.capacity_sectors, 128);
    assert_eq!(saved.transport.queues.len(), 1);
    assert!(saved.transport.queues[0].ready);
    assert_eq!(saved.transport.queues[0].next_avail, 2);
    let status_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
    assert_eq!(saved.transport.status, status_ok);

    let layer_path = dir.join("layer.bin");
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&layer_path)
        .unwrap();
    let facts = write_layer(a.dev.backend().disk(), &out).unwrap();
    let layer = SnapshotLayer::open(File::open(&layer_path).unwrap(), &facts).unwrap();
    let clone = |layer| CowDisk::layered(base.clone(), layer, &OverlaySpec::Memory).unwrap();
    let mut b = a.restored(clone(layer.clone())).unwrap();
    let mut c = a.restored(clone(layer)).unwrap();
    assert_eq!(b.dev.blk_state(), saved);
    assert_eq!(b.read_reg(regs::STATUS), u32::from(status_ok));
    // The pending write runs on B's first notify, in B only.
    b.kick();
    assert_eq!(b.take_used(), Some((10, 1)), "the status byte written");
    assert_eq!(b.read_disk(16, 512).unwrap(), vec![0xcd; 512]);
    assert_eq!(b.read_disk(8, 512).unwrap(), vec![0xab; 512]);
    assert_eq!(b.read_disk(0, 512).unwrap(), vec![0x11; 512]);
    assert_eq!(b.write_disk(24, &[0x77; 512]), 0);
    assert_eq!(b.read_disk(24, 512).unwrap(), vec![0x77; 512]);
    // C, restored from the same state, runs the same pending write and sees the template's
    // write, but none of B's.
    c.kick();
    assert_eq!(c.take_used(), Some((10, 1)));
    assert_eq!(c.read_disk(16, 512).unwrap(), vec![0xcd; 512]);
    assert_eq!(c.read_disk(8, 512).unwrap(), vec![0xab; 512]);
    assert_eq!(c.read_disk(24, 512).unwrap(), vec![0x11; 512]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_restore_refuses_another_disk_size_or_feature_set() {
    let dir = tempdir("refuse");
    let path = dir.join("base.img");
    std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
    let small = dir.join("small.img");
    std::fs::write(&small, vec![0u8; 32 << 10]).unwrap();
    let a = TestDriver::new(
        CowDisk::new(BaseImage::open(&path).unwrap(), &OverlaySpec::Memory).unwrap(),
    );
    let other = CowDisk::new(BaseImage::open(&small).unwrap(), &OverlaySpec::Memory).unwrap();
    let e = a.restored(other).expect_err("size");
    assert!(e.to_string().contains("128 sectors, this one 64"), "{e}");
    let mut saved = a.dev.blk_state();
    saved.device_features |= 1 << 20;
    let mut d = TestDriver::new(
        CowDisk::new(BaseImage::open(&path).unwrap(), &OverlaySpec::Memory).unwrap(),
    );
    let e = d.dev.restore_blk(&saved).expect_err("features");
    assert!(e.to_string().contains("features"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
