//! The copy-on-write virtio-blk device (virtio 1.2, §5.2): Disco's shared
//! disks.
//!
//! This module owns [`VirtioBlk`], the [`VirtioBackend`] of a block device
//! on the virtio-mmio transport: its configuration space, offered features,
//! one request queue, and its [`DiskMetrics`]. The data lives in a
//! [`disk::CowDisk`]: a read-only [`disk::BaseImage`] that every VM of a
//! process shares, plus a private overlay per VM (in memory or a sparse
//! file) that receives every write. Requests are parsed and executed by
//! [`request`].
//!
//! # Where requests run
//!
//! On the vCPU thread that writes `QueueNotify`, inside the MMIO exit: the
//! work per notification is bounded (at most one pass over the ring, i.e.
//! `QueueNum` chains, each of at most [`request::MAX_REQUEST_BYTES`] of
//! data), it is page-cache reads and writes of the base and overlay files
//! or memory copies, and no flush waits on the disk (`FLUSH` is a no-op:
//! the overlay is private scratch state). This keeps the device free of
//! threads and cross-thread state, and a guest that submits I/O pays for
//! it on its own vCPU, as with a synchronous disk. The used-buffer
//! interrupt goes through the transport's interrupt (the VM's irqfd).
//!
//! # Offered features
//!
//! `VIRTIO_BLK_F_SIZE_MAX` (32 KiB per segment), `VIRTIO_BLK_F_SEG_MAX`
//! (queue size − 2 segments per request), `VIRTIO_BLK_F_BLK_SIZE` (512) and
//! `VIRTIO_BLK_F_FLUSH`; no event index, no multiqueue, no discard.
pub mod disk;
pub mod layer;
pub mod map;
pub mod request;
pub mod test_driver;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::virtio_mmio::{VirtioBackend, VirtioMmio};
use disk::{CowDisk, SECTOR_SIZE};
use map::{BaseMapper, MapCounters};
use request::ID_LEN;

/// virtio device ID of a block device.
pub const VIRTIO_BLK_DEVICE_ID: u32 = 2;
/// Vendor ID reported (`"MB"`, as the profiler device).
pub const VIRTIO_BLK_VENDOR_ID: u32 = 0x4d42;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest segment a driver may use (`size_max`).
pub const SIZE_MAX: u32 = 32 << 10;
/// Feature bit: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature bit: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit: the device handles `FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Length of the configuration space exposed (up to and including
/// `blk_size`; later fields belong to features not offered).
pub const CONFIG_LEN: usize = 24;

/// What a block device did. All counters are monotonic except
/// `overlay_blocks`, the number of blocks the overlay holds.
#[derive(Debug, Default)]
pub struct DiskMetrics {
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) unsupported: AtomicU64,
    pub(crate) io_errors: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) bad_queues: AtomicU64,
    overlay_blocks: AtomicU64,
    pub(crate) map: MapCounters,
}

impl DiskMetrics {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn set_overlay_blocks(&self, n: u64) {
        self.overlay_blocks.store(n, Ordering::Relaxed);
    }
    /// `IN` requests completed.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
    /// `OUT` requests completed.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
    /// Bytes read by the guest.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }
    /// Bytes written by the guest (into the overlay).
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Relaxed)
    }
    /// `FLUSH` requests.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
    /// Requests of an unknown type (answered `UNSUPP`).
    pub fn unsupported(&self) -> u64 {
        self.unsupported.load(Ordering::Relaxed)
    }
    /// Requests answered `IOERR` (bad sector, size or direction, or a host
    /// I/O error).
    pub fn io_errors(&self) -> u64 {
        self.io_errors.load(Ordering::Relaxed)
    }
    /// Chains returned without a status (see [`request`]).
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
    /// Notifications of a queue whose rings lie outside guest memory.
    pub fn bad_queues(&self) -> u64 {
        self.bad_queues.load(Ordering::Relaxed)
    }
    /// Blocks ([`disk::BLOCK_SIZE`] bytes each) held by the overlay.
    pub fn overlay_blocks(&self) -> u64 {
        self.overlay_blocks.load(Ordering::Relaxed)
    }
    /// Guest pages a read mapped from the base instead of copying (`map=on`).
    pub fn mapped_pages(&self) -> u64 {
        self.map.mapped_pages.load(Ordering::Relaxed)
    }
    /// `mmap` calls that mapped them.
    pub fn mappings(&self) -> u64 {
        self.map.mappings.load(Ordering::Relaxed)
    }
    /// Pages that could have been mapped but were copied (the VM's mapping budget was spent or
    /// `mmap` failed).
    pub fn map_fallback_pages(&self) -> u64 {
        self.map.fallback_pages.load(Ordering::Relaxed)
    }
}

/// The block device backend: one VM's copy-on-write disk and its queue
/// processing.
#[derive(Debug)]
pub struct VirtioBlk {
    disk: CowDisk,
    mem: GuestMemoryMmap,
    metrics: Arc<DiskMetrics>,
    id: [u8; ID_LEN],
    scratch: Vec<u8>,
    mapper: Option<BaseMapper>,
}

/// A block device as the bus sees it.
pub type VirtioBlkDevice = VirtioMmio<VirtioBlk>;

impl VirtioBlk {
    /// A device over `disk` whose buffers live in `mem`; `id` is the
    /// `GET_ID` answer (truncated to 20 bytes, NUL-padded).
    pub fn new(disk: CowDisk, mem: GuestMemoryMmap, id: &str) -> Self {
        let mut bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Self {
            disk,
            mem,
            metrics: Arc::new(DiskMetrics::default()),
            id: bytes,
            scratch: Vec::new(),
            mapper: None,
        }
    }

    /// Satisfies reads of whole base pages by mapping them (see [`map`]).
    pub fn with_mapper(mut self, mapper: BaseMapper) -> Self {
        self.mapper = Some(mapper);
        self
    }

    /// The device's counters, shareable with a reporter.
    pub fn metrics(&self) -> Arc<DiskMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The disk.
    pub fn disk(&self) -> &CowDisk {
        &self.disk
    }

    /// Whether reads of whole base pages are mapped (`map=on`).
    pub fn maps(&self) -> bool {
        self.mapper.is_some()
    }

    /// Processes the available chains of `queue` (at most one pass over the
    /// ring). Returns whether the driver must be interrupted.
    pub fn process_queue(&mut self, queue: &mut Queue) -> bool {
        if !queue.is_valid(&self.mem) {
            DiskMetrics::bump(&self.metrics.bad_queues);
            return false;
        }
        let mut added = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let descriptors = chain.map(|d| (d.addr().0, d.len(), d.is_write_only()));
            let used = request::execute(
                &self.mem,
                descriptors,
                &mut self.disk,
                request::Io {
                    id: &self.id,
                    scratch: &mut self.scratch,
                    mapper: self.mapper.as_mut(),
                },
                &self.metrics,
            );
            if queue.add_used(&self.mem, head, used).is_err() {
                DiskMetrics::bump(&self.metrics.bad_queues);
                break;
            }
            added = true;
        }
        // Keep a huge request's bounce buffer from living on.
        if self.scratch.capacity() > (1 << 20) {
            self.scratch = Vec::new();
        }
        // If the flags cannot be read, interrupt: a spurious one is harmless.
        added && queue.needs_notification(&self.mem).unwrap_or(true)
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.disk.capacity() / SECTOR_SIZE).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // 16..20: geometry (not offered).
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c
    }
}

impl VirtioMmio<VirtioBlk> {
    /// The device's state, for a snapshot. Requests run to completion inside the notify that
    /// started them (see "Where requests run"), so with the vCPUs out of the guest none is
    /// half done: chains the driver made available but did not have processed yet stay in
    /// the ring, after `next_avail`, and are processed on the next notify.
    pub fn blk_state(&self) -> crate::state::BlockDeviceState {
        crate::state::BlockDeviceState {
            transport: self.transport_state(),
            capacity_sectors: self.backend().disk.capacity() / SECTOR_SIZE,
            device_features: self.backend().device_features(),
        }
    }

    /// Loads a saved state into this (new) device. Its disk must have the saved capacity and
    /// the device offer the saved features.
    pub fn restore_blk(
        &mut self,
        state: &crate::state::BlockDeviceState,
    ) -> Result<(), crate::state::StateError> {
        const DEVICE: &str = "virtio-blk";
        let sectors = self.backend().disk.capacity() / SECTOR_SIZE;
        if state.capacity_sectors != sectors {
            return Err(crate::state::StateError::new(
                DEVICE,
                format!(
                    "the saved disk has {} sectors, this one {sectors}",
                    state.capacity_sectors
                ),
            ));
        }
        if state.device_features != self.backend().device_features() {
            return Err(crate::state::StateError::new(
                DEVICE,
                format!(
                    "saved features {:#x}, this device offers {:#x}",
                    state.device_features,
                    self.backend().device_features()
                ),
            ));
        }
        self.restore_transport(DEVICE, &state.transport)
    }
}

impl VirtioBackend for VirtioBlk {
    fn device_id(&self) -> u32 {
        VIRTIO_BLK_DEVICE_ID
    }
    fn vendor_id(&self) -> u32 {
        VIRTIO_BLK_VENDOR_ID
    }
    fn device_features(&self) -> u64 {
        [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
        ]
        .iter()
        .fold(0, |acc, bit| acc | (1 << bit))
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let config = self.config();
        match config.get(offset..offset + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }
    fn write_config(&mut self, _offset: usize, _data: &[u8], _negotiated: u64) -> bool {
        // Only `writeback` (with VIRTIO_BLK_F_CONFIG_WCE, not offered) is
        // writable.
        false
    }
    fn reset(&mut self) {
        // The disk's contents survive a device reset, as on real hardware.
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn queue_notify(&mut self, index: usize, queues: &mut [Queue]) -> bool {
        match queues.get_mut(index) {
            Some(queue) => self.process_queue(queue),
            None => false,
        }
    }
}
