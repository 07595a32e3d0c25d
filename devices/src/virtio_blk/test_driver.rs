//! A minimal driver side of a virtio-blk device, for tests, benchmarks and
//! fuzzing without a guest: it owns a [`GuestMemoryMmap`], brings a
//! [`VirtioBlkDevice`] up through its MMIO registers (as the Linux driver
//! does), writes descriptor chains and the available ring by hand, notifies
//! the queue, and reads back the used ring.
//!
//! Memory layout (guest-physical): descriptor table at [`DESC_TABLE`],
//! available ring at [`AVAIL_RING`], used ring at [`USED_RING`], and
//! [`DATA`] onwards free for request buffers, up to [`MEM_SIZE`].
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use std::sync::Arc;

use super::disk::CowDisk;
use super::map::{BaseMapper, MappedPages};
use super::{VirtioBlk, VirtioBlkDevice};
use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;
use crate::virtio_mmio::{regs, status, VIRTIO_F_VERSION_1};

/// Guest memory size.
pub const MEM_SIZE: usize = 16 << 20;
/// Descriptor table address.
pub const DESC_TABLE: u64 = 0x1000;
/// Available ring address.
pub const AVAIL_RING: u64 = 0x3000;
/// Used ring address.
pub const USED_RING: u64 = 0x4000;
/// First address free for buffers.
pub const DATA: u64 = 0x10000;
/// Queue size the driver configures.
pub const DRIVER_QUEUE_SIZE: u16 = 128;
/// Descriptor flag: the chain goes on at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// A raw descriptor: (guest address, length, flags, next).
pub type RawDesc = (u64, u32, u16, u16);

/// The low 32 bits of a (small) ring address.
#[allow(clippy::cast_possible_truncation)]
fn low(addr: u64) -> u32 {
    addr as u32
}

/// The driver side of one device.
#[derive(Debug)]
pub struct TestDriver {
    /// Guest memory (shared with the device).
    pub mem: GuestMemoryMmap,
    /// The device.
    pub dev: VirtioBlkDevice,
    avail_idx: u16,
    used_seen: u16,
}

impl TestDriver {
    /// Guest memory of [`MEM_SIZE`] bytes and a device over `disk`, brought
    /// up to `DRIVER_OK` with one queue of [`DRIVER_QUEUE_SIZE`].
    pub fn new(disk: CowDisk) -> Self {
        Self::build(disk, None)
    }

    /// As [`Self::new`], with reads of whole base pages mapped (`map=on`) for at most `budget`
    /// mappings; also returns the record of mapped pages.
    pub fn with_mapping(disk: CowDisk, budget: u64) -> (Self, Arc<MappedPages>) {
        let pages = Arc::new(MappedPages::new(MEM_SIZE as u64));
        let driver = Self::build(disk, Some((budget, pages.clone())));
        (driver, pages)
    }

    fn build(disk: CowDisk, mapping: Option<(u64, Arc<MappedPages>)>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .unwrap_or_else(|e| panic!("test memory: {e}"));
        let base = disk.base().clone();
        let mut blk = VirtioBlk::new(disk, mem.clone(), "test-disk");
        if let Some((budget, pages)) = mapping {
            blk = blk.with_mapper(BaseMapper::new(mem.clone(), base, budget, pages));
        }
        let irq = EventFdTrigger::new().unwrap_or_else(|e| panic!("eventfd: {e}"));
        let mut driver = Self {
            mem,
            dev: VirtioBlkDevice::new(blk, irq),
            avail_idx: 0,
            used_seen: 0,
        };
        driver.bring_up();
        driver
    }

    /// Writes a device register.
    pub fn write_reg(&mut self, reg: u64, value: u32) {
        self.dev.write(reg, &value.to_le_bytes());
    }

    /// Reads a device register.
    pub fn read_reg(&mut self, reg: u64) -> u32 {
        let mut data = [0u8; 4];
        self.dev.read(reg, &mut data);
        u32::from_le_bytes(data)
    }

    fn bring_up(&mut self) {
        self.write_reg(regs::STATUS, 0);
        self.write_reg(
            regs::STATUS,
            u32::from(status::ACKNOWLEDGE | status::DRIVER),
        );
        self.write_reg(regs::DRIVER_FEATURES_SEL, 1);
        self.write_reg(regs::DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
        self.write_reg(regs::DRIVER_FEATURES_SEL, 0);
        self.write_reg(regs::DRIVER_FEATURES, 0);
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write_reg(regs::STATUS, u32::from(ok));
        self.write_reg(regs::QUEUE_SEL, 0);
        self.write_reg(regs::QUEUE_NUM, u32::from(DRIVER_QUEUE_SIZE));
        self.write_reg(regs::QUEUE_DESC_LOW, low(DESC_TABLE));
        self.write_reg(regs::QUEUE_DESC_HIGH, 0);
        self.write_reg(regs::QUEUE_DRIVER_LOW, low(AVAIL_RING));
        self.write_reg(regs::QUEUE_DRIVER_HIGH, 0);
        self.write_reg(regs::QUEUE_DEVICE_LOW, low(USED_RING));
        self.write_reg(regs::QUEUE_DEVICE_HIGH, 0);
        self.write_reg(regs::QUEUE_READY, 1);
        self.write_reg(regs::STATUS, u32::from(ok | status::DRIVER_OK));
        self.avail_idx = 0;
        self.used_seen = 0;
    }

    /// Writes descriptor `index` of the table at `table`.
    pub fn write_desc(&self, table: u64, index: u16, desc: RawDesc) {
        let at = GuestAddress(table + 16 * u64::from(index));
        let (addr, len, flags, next) = desc;
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, at)
            .unwrap_or_else(|e| panic!("descriptor: {e}"));
    }

    /// Puts raw descriptors at table indices 0.., makes index `head`
    /// available, notifies, and returns the used element `(id, len)` the
    /// device added, if any.
    pub fn submit_raw(&mut self, descs: &[RawDesc], head: u16) -> Option<(u32, u32)> {
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(DESC_TABLE, u16::try_from(i).ok()?, *d);
        }
        self.make_available(&[head]);
        self.kick();
        self.take_used()
    }

    /// Adds `heads` to the available ring (without notifying).
    pub fn make_available(&mut self, heads: &[u16]) {
        for &head in heads {
            let slot = u64::from(self.avail_idx % DRIVER_QUEUE_SIZE);
            let ring = GuestAddress(AVAIL_RING + 4 + 2 * slot);
            let _ = self.mem.write_obj(head, ring);
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        let _ = self
            .mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2));
    }

    /// Sets the available ring's index to any value (a hostile driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        let _ = self.mem.write_obj(idx, GuestAddress(AVAIL_RING + 2));
    }

    /// Notifies queue 0.
    pub fn kick(&mut self) {
        self.write_reg(regs::QUEUE_NOTIFY, 0);
    }

    /// The next used element the device added, if any.
    pub fn take_used(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).ok()?;
        if idx == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % DRIVER_QUEUE_SIZE);
        let elem = GuestAddress(USED_RING + 4 + 8 * slot);
        let id: u32 = self.mem.read_obj(elem).ok()?;
        let len: u32 = self.mem.read_obj(GuestAddress(elem.0 + 4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Writes a request header at `at`.
    pub fn write_header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(at))
            .unwrap_or_else(|e| panic!("header: {e}"));
    }

    /// A well-formed three-descriptor request: header at [`DATA`], data at
    /// `DATA + 0x1000` (`len` bytes, device-writable for reads), status
    /// right after the data. Returns `(status, used length)`; status 0xff
    /// means the device wrote none.
    pub fn request(&mut self, kind: u32, sector: u64, len: u32) -> (u8, u32) {
        let data = DATA + 0x1000;
        let status_at = data + u64::from(len);
        self.write_header(DATA, kind, sector);
        let _ = self.mem.write_obj(0xffu8, GuestAddress(status_at));
        let dir = if kind == super::request::VIRTIO_BLK_T_OUT {
            0
        } else {
            F_WRITE
        };
        let descs = [
            (DATA, 16, F_NEXT, 1),
            (data, len, F_NEXT | dir, 2),
            (status_at, 1, F_WRITE, 0),
        ];
        let used = self.submit_raw(&descs, 0).map_or(u32::MAX, |(_, l)| l);
        let status: u8 = self.mem.read_obj(GuestAddress(status_at)).unwrap_or(0xfe);
        (status, used)
    }

    /// Reads `len` bytes of the disk at `sector` into guest memory at `buf` (header at
    /// [`DATA`], status byte at `DATA + 0x800`; `buf` should not overlap them). Returns the
    /// status (0xff: the device wrote none).
    pub fn read_to(&mut self, sector: u64, len: u32, buf: u64) -> u8 {
        let status_at = DATA + 0x800;
        self.write_header(DATA, super::request::VIRTIO_BLK_T_IN, sector);
        let _ = self.mem.write_obj(0xffu8, GuestAddress(status_at));
        let descs = [
            (DATA, 16, F_NEXT, 1),
            (buf, len, F_NEXT | F_WRITE, 2),
            (status_at, 1, F_WRITE, 0),
        ];
        let _ = self.submit_raw(&descs, 0);
        self.mem.read_obj(GuestAddress(status_at)).unwrap_or(0xfe)
    }

    /// Reads `len` bytes of the disk at `sector` through the device.
    pub fn read_disk(&mut self, sector: u64, len: u32) -> Option<Vec<u8>> {
        let (status, _) = self.request(super::request::VIRTIO_BLK_T_IN, sector, len);
        let mut out = vec![0u8; usize::try_from(len).ok()?];
        self.mem
            .read_slice(&mut out, GuestAddress(DATA + 0x1000))
            .ok()?;
        (status == 0).then_some(out)
    }

    /// Writes `data` to the disk at `sector` through the device; returns the
    /// status.
    pub fn write_disk(&mut self, sector: u64, data: &[u8]) -> u8 {
        let _ = self.mem.write_slice(data, GuestAddress(DATA + 0x1000));
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.request(super::request::VIRTIO_BLK_T_OUT, sector, len)
            .0
    }

    /// A snapshot and restore of this driver's VM: a new driver whose guest memory is a copy
    /// of this one's and whose device, over `disk`, gets this device's saved state (as a
    /// restored clone's would), with the driver's ring positions carried over.
    pub fn restored(&self, disk: CowDisk) -> Result<Self, crate::state::StateError> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .unwrap_or_else(|e| panic!("test memory: {e}"));
        let mut bytes = vec![0u8; MEM_SIZE];
        self.mem
            .read_slice(&mut bytes, GuestAddress(0))
            .unwrap_or_else(|e| panic!("copy memory: {e}"));
        mem.write_slice(&bytes, GuestAddress(0))
            .unwrap_or_else(|e| panic!("copy memory: {e}"));
        let blk = VirtioBlk::new(disk, mem.clone(), "test-disk");
        let irq = EventFdTrigger::new().unwrap_or_else(|e| panic!("eventfd: {e}"));
        let mut dev = VirtioBlkDevice::new(blk, irq);
        dev.restore_blk(&self.dev.blk_state())?;
        Ok(Self {
            mem,
            dev,
            avail_idx: self.avail_idx,
            used_seen: self.used_seen,
        })
    }
}
