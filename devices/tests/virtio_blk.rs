//! The copy-on-write virtio-blk device over hand-built virtqueues (no KVM):
//! reads come from the base, writes stay in one device's overlay, partial
//! blocks are merged, and malformed chains and requests are refused without
//! a panic.
mod common;

use std::path::Path;

use common::BaseFixture as Fixture;
use mirrorball_devices::virtio_blk::disk::{CowDisk, OverlaySpec};
use mirrorball_devices::virtio_blk::request::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use mirrorball_devices::virtio_blk::test_driver::{
    TestDriver, DATA, DESC_TABLE, F_INDIRECT, F_NEXT, F_WRITE, MEM_SIZE,
};
use mirrorball_devices::virtio_mmio::{regs, INTERRUPT_USED_BUFFER};
use vm_memory::{Bytes, GuestAddress};

const BASE_LEN: usize = 64 << 10;

impl Fixture {
    fn new(tag: &str) -> Self {
        Self::with_base("mb-blk", tag, BASE_LEN, |i| {
            u8::try_from(i * 7 % 253).unwrap_or(0)
        })
    }

    fn driver(&self, overlay: &OverlaySpec) -> TestDriver {
        TestDriver::new(CowDisk::new(self.base.clone(), overlay).unwrap())
    }

    fn base_unchanged(&self) -> bool {
        std::fs::read(&self.base_path).unwrap() == self.original
    }
}

fn overlays(dir: &Path) -> [OverlaySpec; 2] {
    [OverlaySpec::Memory, OverlaySpec::File(dir.join("overlay"))]
}

#[test]
fn reads_of_untouched_blocks_come_from_the_base_and_interrupt_the_driver() {
    let f = Fixture::new("read");
    let mut d = f.driver(&OverlaySpec::Memory);
    let (status, used) = d.request(VIRTIO_BLK_T_IN, 8, 4096);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 4097));
    let mut got = vec![0u8; 4096];
    d.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, f.original[4096..8192]);
    assert_eq!(d.read_reg(regs::INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
    assert_eq!(d.dev.interrupt().event_fd().read().unwrap(), 1);
    // Unaligned to blocks, across several of them.
    assert_eq!(
        d.read_disk(3, 3 * 4096).unwrap(),
        f.original[1536..1536 + 3 * 4096]
    );
    let m = d.dev.backend().metrics();
    assert_eq!((m.reads(), m.read_bytes()), (2, 4096 + 3 * 4096));
    // Capacity in sectors, as the driver reads it.
    let mut cap = [0u8; 8];
    mirrorball_devices::bus::BusDevice::read(&mut d.dev, 0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (BASE_LEN / 512) as u64);
}

#[test]
fn writes_go_to_one_overlay_only() {
    let f = Fixture::new("write");
    for spec in overlays(&f.dir) {
        let mut a = f.driver(&spec);
        let mut b = f.driver(&OverlaySpec::Memory);
        assert_eq!(a.write_disk(16, &[0xab; 4096]), VIRTIO_BLK_S_OK);
        assert_eq!(a.read_disk(16, 4096).unwrap(), vec![0xab; 4096]);
        // Another VM's device on the same base does not see it.
        assert_eq!(b.read_disk(16, 4096).unwrap(), f.original[8192..12288]);
        assert!(f.base_unchanged());
        let m = a.dev.backend().metrics();
        assert_eq!(
            (m.writes(), m.written_bytes(), m.overlay_blocks()),
            (1, 4096, 1)
        );
        if let OverlaySpec::File(path) = &spec {
            let meta = std::fs::metadata(path).unwrap();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert_eq!(meta.len(), BASE_LEN as u64);
            drop(a);
            std::fs::remove_file(path).unwrap();
        }
    }
}

#[test]
fn partial_block_writes_merge_with_the_base() {
    let f = Fixture::new("partial");
    for spec in overlays(&f.dir) {
        let mut d = f.driver(&spec);
        // Sector 3 lies inside block 0; sectors 7..9 straddle blocks 0 and 1.
        assert_eq!(d.write_disk(3, &[1; 512]), VIRTIO_BLK_S_OK);
        assert_eq!(d.write_disk(7, &[2; 1024]), VIRTIO_BLK_S_OK);
        let mut want = f.original[..3 * 4096].to_vec();
        want[1536..2048].fill(1);
        want[3584..4608].fill(2);
        assert_eq!(d.read_disk(0, 3 * 4096).unwrap(), want);
        assert_eq!(d.dev.backend().metrics().overlay_blocks(), 2);
        assert!(f.base_unchanged());
    }
}

#[test]
fn flush_get_id_and_unknown_types() {
    let f = Fixture::new("misc");
    let mut d = f.driver(&OverlaySpec::Memory);
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, 0x10).0, VIRTIO_BLK_S_OK);
    let (status, used) = d.request(VIRTIO_BLK_T_GET_ID, 0, 20);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    d.mem
        .read_slice(&mut id, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(&id[..9], b"test-disk");
    assert_eq!(id[9..], [0; 11]);
    for kind in [2, 5, 11, 0xffff_ffff] {
        assert_eq!(d.request(kind, 0, 512).0, VIRTIO_BLK_S_UNSUPP);
    }
    assert_eq!(d.dev.backend().metrics().unsupported(), 4);
}

#[test]
fn bad_requests_fail_with_ioerr() {
    let f = Fixture::new("ioerr");
    let mut d = f.driver(&OverlaySpec::Memory);
    let sectors = (BASE_LEN / 512) as u64;
    for (kind, sector, len) in [
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 512),
        (VIRTIO_BLK_T_IN, sectors, 512),
        (VIRTIO_BLK_T_IN, sectors - 1, 1024),
        (VIRTIO_BLK_T_OUT, sectors - 1, 1024),
        (VIRTIO_BLK_T_OUT, u64::MAX, 512),
        (VIRTIO_BLK_T_IN, 0, 100),
        (VIRTIO_BLK_T_OUT, 0, 513),
        (VIRTIO_BLK_T_IN, 0, 8 << 20),
    ] {
        assert_eq!(
            d.request(kind, sector, len).0,
            VIRTIO_BLK_S_IOERR,
            "{kind} {sector} {len}"
        );
    }
    // Data in the wrong direction: a read whose buffer is device-readable.
    d.write_header(DATA, VIRTIO_BLK_T_IN, 0);
    let descs = [
        (DATA, 16, F_NEXT, 1),
        (DATA + 0x1000, 512, F_NEXT, 2),
        (DATA + 0x2000, 1, F_WRITE, 0),
    ];
    assert_eq!(d.submit_raw(&descs, 0), Some((0, 1)));
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(DATA + 0x2000)).unwrap(),
        1
    );
    // A header shorter than 16 bytes.
    let descs = [(DATA, 8, F_NEXT, 1), (DATA + 0x2000, 1, F_WRITE, 0)];
    assert_eq!(d.submit_raw(&descs, 0), Some((0, 1)));
    assert!(f.base_unchanged());
    assert_eq!(d.dev.backend().metrics().overlay_blocks(), 0);
}

#[test]
fn malformed_chains_get_no_status_and_no_panic() {
    let f = Fixture::new("malformed");
    let mut d = f.driver(&OverlaySpec::Memory);
    let status = DATA + 0x2000;
    d.write_header(DATA, VIRTIO_BLK_T_IN, 0);
    let far = MEM_SIZE as u64 + 0x1000;
    let cases: Vec<Vec<(u64, u32, u16, u16)>> = vec![
        // Zero-length data descriptor.
        vec![
            (DATA, 16, F_NEXT, 1),
            (DATA + 0x1000, 0, F_NEXT | F_WRITE, 2),
            (status, 1, F_WRITE, 0),
        ],
        // Buffers outside guest memory, or wrapping the address space.
        vec![
            (DATA, 16, F_NEXT, 1),
            (far, 512, F_NEXT | F_WRITE, 2),
            (status, 1, F_WRITE, 0),
        ],
        vec![
            (DATA, 16, F_NEXT, 1),
            (u64::MAX - 10, 512, F_NEXT | F_WRITE, 2),
            (status, 1, F_WRITE, 0),
        ],
        vec![(DATA, 16, F_NEXT, 1), (far, 1, F_WRITE, 0)],
        // A readable descriptor after a writable one.
        vec![
            (DATA, 16, F_NEXT | F_WRITE, 1),
            (DATA + 0x1000, 512, F_NEXT, 2),
            (status, 1, F_WRITE, 0),
        ],
        // No writable byte for the status.
        vec![(DATA, 16, 0, 0)],
        // A loop: 0 -> 1 -> 0 ...
        vec![(DATA, 16, F_NEXT, 1), (DATA + 0x1000, 512, F_NEXT, 0)],
        // `next` past the table.
        vec![(DATA, 16, F_NEXT, 500)],
        // An indirect table outside memory, and one of odd length.
        vec![(far, 64, F_INDIRECT, 0)],
        vec![(DATA + 0x3000, 17, F_INDIRECT, 0)],
    ];
    for (i, descs) in cases.iter().enumerate() {
        d.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let used = d.submit_raw(descs, 0);
        assert_eq!(used, Some((0, 0)), "case {i}");
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            0xff,
            "case {i}"
        );
    }
    assert_eq!(d.dev.backend().metrics().malformed(), cases.len() as u64);
    // A head index past the queue: nothing is used, nothing panics.
    assert_eq!(d.submit_raw(&[(DATA, 16, 0, 0)], 4000), None);
    // An available index far ahead of the device: ignored.
    d.set_avail_idx(0x8000);
    d.kick();
    // The device still serves well-formed requests afterwards.
    let mut fresh = f.driver(&OverlaySpec::Memory);
    assert_eq!(fresh.read_disk(0, 512).unwrap(), f.original[..512]);
    assert!(f.base_unchanged());
}

#[test]
fn indirect_chains_work() {
    let f = Fixture::new("indirect");
    let mut d = f.driver(&OverlaySpec::Memory);
    let table = DATA + 0x8000;
    d.write_header(DATA, VIRTIO_BLK_T_IN, 2);
    d.write_desc(table, 0, (DATA, 16, F_NEXT, 1));
    d.write_desc(table, 1, (DATA + 0x1000, 1024, F_NEXT | F_WRITE, 2));
    d.write_desc(table, 2, (DATA + 0x2000, 1, F_WRITE, 0));
    assert_eq!(
        d.submit_raw(&[(table, 48, F_INDIRECT, 0)], 0),
        Some((0, 1025))
    );
    let mut got = vec![0u8; 1024];
    d.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, f.original[1024..2048]);
}

#[test]
fn notifications_before_driver_ok_or_of_missing_queues_are_refused() {
    let f = Fixture::new("notify");
    let mut d = f.driver(&OverlaySpec::Memory);
    let before = d.dev.metrics().protocol_errors();
    d.write_reg(regs::QUEUE_NOTIFY, 1);
    d.write_reg(regs::QUEUE_NOTIFY, u32::MAX);
    assert_eq!(d.dev.metrics().protocol_errors(), before + 2);
    // Rings outside guest memory: the queue is refused when notified.
    d.write_reg(regs::STATUS, 0);
    d.write_reg(regs::STATUS, 3);
    d.write_reg(regs::DRIVER_FEATURES_SEL, 1);
    d.write_reg(regs::DRIVER_FEATURES, 1);
    d.write_reg(regs::STATUS, 11);
    d.write_reg(regs::QUEUE_NUM, 128);
    d.write_reg(regs::QUEUE_DESC_LOW, u32::try_from(DESC_TABLE).unwrap());
    d.write_reg(regs::QUEUE_DESC_HIGH, 0x10);
    d.write_reg(regs::QUEUE_DRIVER_LOW, 0x3000);
    d.write_reg(regs::QUEUE_DEVICE_LOW, 0x4000);
    d.write_reg(regs::QUEUE_READY, 1);
    d.write_reg(regs::STATUS, 15);
    d.kick();
    assert_eq!(d.dev.backend().metrics().bad_queues(), 1);
}
