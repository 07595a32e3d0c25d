//! Reads satisfied by mapping base pages (`map=on`), over hand-built virtqueues (no KVM): two
//! devices ("VMs") reading the same base blocks end up with the same machine pages (one page
//! frame, per `/proc/self/pagemap`), a write to a mapped guest page stays private to that guest
//! and never reaches the base, blocks the overlay holds are copied, unaligned reads are copied,
//! and a spent mapping budget falls back to copying with the same data.
mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::BaseFixture as Fixture;
use mirrorball_devices::virtio_blk::disk::{CowDisk, OverlaySpec};
use mirrorball_devices::virtio_blk::test_driver::{TestDriver, DATA};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const BASE_LEN: usize = 256 << 10;
/// Where [`TestDriver::request`] puts the data buffer (page-aligned).
const BUF: u64 = DATA + 0x1000;
const PAGE: u64 = 4096;

const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
const PFN_MASK: u64 = (1 << 55) - 1;

impl Fixture {
    fn new(tag: &str) -> Self {
        Self::with_base("mb-blkmap", tag, BASE_LEN, |i| {
            u8::try_from(i * 13 % 251).unwrap_or(0)
        })
    }

    fn mapped(&self, budget: u64) -> TestDriver {
        TestDriver::with_mapping(
            CowDisk::new(self.base.clone(), &OverlaySpec::Memory).unwrap(),
            budget,
        )
        .0
    }

    fn copied(&self) -> TestDriver {
        TestDriver::new(CowDisk::new(self.base.clone(), &OverlaySpec::Memory).unwrap())
    }

    fn base_unchanged(&self) -> bool {
        std::fs::read(&self.base_path).unwrap() == self.original
    }

    fn want(&self, offset: usize, len: usize) -> &[u8] {
        &self.original[offset..offset + len]
    }
}

/// The pagemap entry of the host page behind guest page `gpa` of `driver`.
fn pagemap(driver: &TestDriver, gpa: u64) -> u64 {
    let host = driver.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let mut entry = [0u8; 8];
    File::open("/proc/self/pagemap")
        .unwrap()
        .read_exact_at(&mut entry, host / PAGE * 8)
        .unwrap();
    u64::from_le_bytes(entry)
}

fn read_guest(driver: &TestDriver, gpa: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    driver.mem.read_slice(&mut out, GuestAddress(gpa)).unwrap();
    out
}

#[test]
fn two_vms_reading_the_same_blocks_share_machine_pages() {
    let f = Fixture::new("share");
    let mut a = f.mapped(1000);
    let mut b = f.mapped(1000);
    let mut c = f.copied();
    // 16 KiB from byte 8192 (sector 16): four whole, aligned base pages.
    for d in [&mut a, &mut b, &mut c] {
        assert!(d.read_disk(16, 16 << 10).as_deref() == Some(f.want(8192, 16 << 10)));
    }
    for d in [&a, &b] {
        let m = d.dev.backend().metrics();
        assert_eq!(
            (m.mapped_pages(), m.mappings(), m.map_fallback_pages()),
            (4, 1, 0)
        );
        assert_eq!(m.reads(), 1);
    }
    assert_eq!(c.dev.backend().metrics().mapped_pages(), 0);
    // Mapped pages are present at once, before the guest looks at them.
    let mut d = f.mapped(1000);
    assert_eq!(d.read_to(16, 16 << 10, BUF), 0);
    for page in 0..4 {
        let e = pagemap(&d, BUF + page * PAGE);
        assert!(
            e & PM_PRESENT != 0 && e & PM_FILE != 0,
            "page {page}: {e:#x}"
        );
    }
    let root = pagemap(&a, BUF) & PFN_MASK != 0;
    for page in 0..4 {
        let gpa = BUF + page * PAGE;
        let (ea, eb, ec) = (pagemap(&a, gpa), pagemap(&b, gpa), pagemap(&c, gpa));
        assert!(ea & PM_PRESENT != 0 && eb & PM_PRESENT != 0 && ec & PM_PRESENT != 0);
        assert!(
            ea & PM_FILE != 0 && eb & PM_FILE != 0,
            "mapped pages are file pages"
        );
        assert!(ec & PM_FILE == 0, "a copied page is anonymous memory");
        if root {
            assert_eq!(
                ea & PFN_MASK,
                eb & PFN_MASK,
                "one machine page for both VMs"
            );
            assert_ne!(
                ea & PFN_MASK,
                ec & PFN_MASK,
                "the copy has a page of its own"
            );
        } else {
            eprintln!("page frame numbers need CAP_SYS_ADMIN: sharing checked by page type only");
        }
    }
    assert!(f.base_unchanged());
}

#[test]
fn a_write_after_a_mapped_read_stays_in_its_vm() {
    let f = Fixture::new("write");
    let mut a = f.mapped(1000);
    let mut b = f.mapped(1000);
    for d in [&mut a, &mut b] {
        assert!(d.read_disk(0, 8192).as_deref() == Some(f.want(0, 8192)));
    }
    // The guest of a writes into the page the read mapped: copy-on-write.
    a.mem
        .write_slice(&[0xab; 100], GuestAddress(BUF + 10))
        .unwrap();
    assert_eq!(&read_guest(&a, BUF + 10, 100), &[0xab; 100][..]);
    assert_eq!(
        read_guest(&b, BUF, 8192),
        f.want(0, 8192),
        "b still sees the base"
    );
    assert!(f.base_unchanged(), "the base file is never written");
    assert_eq!(pagemap(&a, BUF) & PM_FILE, 0, "a's page is now its own");
    assert_ne!(
        pagemap(&a, BUF + PAGE) & PM_FILE,
        0,
        "a's other page is still mapped"
    );
    // A later read into the written page maps the base again.
    assert!(a.read_disk(0, 8192).as_deref() == Some(f.want(0, 8192)));
    assert_eq!(a.dev.backend().metrics().mapped_pages(), 4);
}

#[test]
fn blocks_the_overlay_holds_and_unaligned_reads_are_copied() {
    let f = Fixture::new("overlay");
    let mut a = f.mapped(1000);
    // Block 1 (bytes 4096..8192) is written: it must come from the overlay.
    assert_eq!(a.write_disk(8, &[0x5a; 4096]), 0);
    let got = a.read_disk(0, 16 << 10).expect("read");
    let mut want = f.want(0, 16 << 10).to_vec();
    want[4096..8192].fill(0x5a);
    assert!(got == want, "the overlay block and the base blocks");
    let m = a.dev.backend().metrics();
    assert_eq!(
        m.mapped_pages(),
        3,
        "blocks 0, 2 and 3 mapped, block 1 copied"
    );
    assert_eq!(m.mappings(), 2);
    assert_eq!(
        pagemap(&a, BUF + PAGE) & PM_FILE,
        0,
        "the overlay block was copied"
    );
    // Sector 17 is not page-aligned on the disk: copied.
    assert!(a.read_disk(17, 8192).as_deref() == Some(f.want(17 * 512, 8192)));
    // A read shorter than a page: copied.
    assert!(a.read_disk(24, 2048).as_deref() == Some(f.want(24 * 512, 2048)));
    assert_eq!(a.dev.backend().metrics().mapped_pages(), 3);
    assert!(f.base_unchanged());
}

#[test]
fn a_spent_budget_falls_back_to_copying() {
    let f = Fixture::new("budget");
    let mut a = f.mapped(1);
    assert!(a.read_disk(0, 8192).as_deref() == Some(f.want(0, 8192)));
    assert!(a.read_disk(64, 8192).as_deref() == Some(f.want(64 * 512, 8192)));
    let m = a.dev.backend().metrics();
    assert_eq!(
        (m.mapped_pages(), m.mappings(), m.map_fallback_pages()),
        (2, 1, 2)
    );
    assert_eq!(pagemap(&a, BUF) & PM_FILE, 0, "the second read was copied");
    // The last block of the disk, read whole.
    let last = (BASE_LEN as u64 / 512) - 8;
    assert!(a.read_disk(last, 4096).as_deref() == Some(f.want(BASE_LEN - 4096, 4096)));
}
