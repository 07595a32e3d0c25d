//! The virtio-mmio transport, version 2 (virtio 1.2, §4.2), with split virtqueues.
//!
//! This module owns [`VirtioMmio`]: the generic register file a guest driver
//! sees in a device's 4 KiB MMIO window ([`VIRTIO_MMIO_WINDOW`]), its device
//! status state machine (§2.1), feature negotiation (§2.2), shared memory
//! region discovery (§2.10, §4.2.2) and configuration-change interrupts. What
//! the device *is* comes from a [`VirtioBackend`]: its IDs, offered features,
//! shared memory regions and device-specific configuration space.
//!
//! A backend lists its virtqueues ([`VirtioBackend::queue_max_sizes`]); the
//! queue registers live in [`queues`]. A backend without queues (the profiler
//! device, [`crate::profiler_device`]) sees every queue reported absent
//! (`QueueNumMax` reads 0). A `QueueNotify` write for an existing queue,
//! once the driver has set `DRIVER_OK` (and neither `FAILED` nor
//! `DEVICE_NEEDS_RESET` is set), calls [`VirtioBackend::queue_notify`] on the
//! writing vCPU's thread; if the backend reports used buffers that the
//! driver wants to hear about, the transport sets bit 0 of `InterruptStatus`
//! and signals the interrupt.
//!
//! # Register layout (offsets from the window base)
//!
//! All registers are 32 bits wide, little endian. R = read-only, W =
//! write-only, RW = both.
//!
//! | offset  | name                          | dir | behaviour here |
//! |---------|-------------------------------|-----|----------------|
//! | 0x000   | `MagicValue`                  | R   | 0x7472_6976 (`"virt"`) |
//! | 0x004   | `Version`                     | R   | 2 |
//! | 0x008   | `DeviceID`                    | R   | [`VirtioBackend::device_id`] |
//! | 0x00c   | `VendorID`                    | R   | [`VirtioBackend::vendor_id`] |
//! | 0x010   | `DeviceFeatures`              | R   | 32 offered bits, word `DeviceFeaturesSel` (0 or 1; other words read 0) |
//! | 0x014   | `DeviceFeaturesSel`           | W   | any value |
//! | 0x020   | `DriverFeatures`              | W   | 32 accepted bits, word `DriverFeaturesSel`; ignored once `FEATURES_OK` is set |
//! | 0x024   | `DriverFeaturesSel`           | W   | any value |
//! | 0x030   | `QueueSel`                    | W   | any value (a missing queue reads as absent) |
//! | 0x034   | `QueueNumMax`                 | R   | the selected queue's maximum size; 0 if it does not exist |
//! | 0x038   | `QueueNum`                    | W   | power of two ≤ `QueueNumMax`, queue not ready ([`queues`]) |
//! | 0x044   | `QueueReady`                  | RW  | 0 or 1 |
//! | 0x050   | `QueueNotify`                 | W   | queue index: the backend processes it (after `DRIVER_OK`) |
//! | 0x060   | `InterruptStatus`             | R   | bit 0: used buffers; bit 1: configuration change |
//! | 0x064   | `InterruptACK`                | W   | clears the bits written |
//! | 0x070   | `Status`                      | RW  | device status, see below; writing 0 resets |
//! | 0x080/4 | `QueueDescLow/High`           | W   | 16-aligned, queue not ready |
//! | 0x090/4 | `QueueDriverLow/High`         | W   | 2-aligned, queue not ready |
//! | 0x0a0/4 | `QueueDeviceLow/High`         | W   | 4-aligned, queue not ready |
//! | 0x0ac   | `SHMSel`                      | W   | any value |
//! | 0x0b0/4 | `SHMLenLow/High`              | R   | length of region `SHMSel`; all ones if it does not exist |
//! | 0x0b8/c | `SHMBaseLow/High`             | R   | guest-physical base of region `SHMSel`; all ones if it does not exist |
//! | 0x0c0   | `QueueReset`                  | RW  | reads 0; writes ignored (protocol error) |
//! | 0x0fc   | `ConfigGeneration`            | R   | bumped on every host-side configuration change |
//! | 0x100+  | `Config`                      | RW  | device-specific, [`VirtioBackend::config_len`] bytes |
//!
//! # Hostile accesses
//!
//! Every access is guest-controlled. A register access must be exactly 4
//! bytes at a 4-aligned offset below 0x100 (the spec's "32 bit wide and
//! aligned" rule); a configuration access must be 1, 2, 4 or 8 bytes and lie
//! entirely inside the backend's configuration space (any alignment: the spec
//! says the space "is accessed with byte alignment"). Anything else (another
//! size, an offset in a hole, past the configuration space or past the
//! window, a read of a write-only register, a write to a read-only one) is
//! ignored: writes are dropped, reads return zeros, and
//! [`VirtioMmioMetrics::bad_accesses`] counts it.
//!
//! Well-formed accesses that the state machine rejects (a status write that
//! clears bits or skips a step, a queue register write that [`queues`]
//! refuses or one before `FEATURES_OK`, a notification of a missing queue or
//! before `DRIVER_OK`, a feature write after
//! `FEATURES_OK`, a configuration write before `FEATURES_OK` or one the
//! backend refuses) are dropped and counted in
//! [`VirtioMmioMetrics::protocol_errors`].
//!
//! # Device status (§2.1, §3.1)
//!
//! Writing 0 resets the device: status, negotiated features, selectors,
//! `InterruptStatus` and the backend's guest-written state are cleared
//! (`ConfigGeneration` keeps counting). A non-zero write sets status bits:
//!
//! * bits may only be added; a write that would clear a bit the device holds
//!   (other than `DEVICE_NEEDS_RESET`, which belongs to the device and is
//!   ignored in written values) or that sets an undefined bit is dropped;
//! * `ACKNOWLEDGE`, `DRIVER`, `FEATURES_OK`, `DRIVER_OK` must come in that
//!   order (each needs the previous one, in the current status or the same
//!   write); a bit whose predecessor is missing is not set, nor any later one;
//! * `FEATURES_OK` is set only if the accepted features are a subset of the
//!   offered ones and include `VIRTIO_F_VERSION_1`; otherwise it stays clear,
//!   which is how the driver learns the device refused (it must read the
//!   status back), and [`VirtioMmioMetrics::features_refused`] counts it;
//! * `FAILED` may be set at any time; after it the status is frozen until a
//!   reset.
//!
//! # Interrupts
//!
//! The device has one interrupt, an [`EventFdTrigger`] (the VMM registers a
//! clone of its eventfd as the irqfd of the device's GSI). A host-side
//! configuration change ([`VirtioMmio::notify_config_change`]) bumps
//! `ConfigGeneration` and, if the driver has set `DRIVER_OK` (a device must
//! not notify the driver before that), sets bit 1 of `InterruptStatus` and
//! signals the eventfd once. The bit stays set until the driver writes it to
//! `InterruptACK`.

mod queues;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use virtio_queue::Queue;
use vm_superio::Trigger;

use queues::QueueRegisters;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Size of a virtio-mmio device's window: the registers, then the
/// device-specific configuration space, padded to one page.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// `MagicValue`: `"virt"` read as a little-endian `u32`.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version` of the non-legacy virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// Offset of the device-specific configuration space in the window.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets in the window (§4.2.2, table "MMIO Device Register
/// Layout").
pub mod regs {
    /// `MagicValue` (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version` (R).
    pub const VERSION: u64 = 0x004;
    /// `DeviceID` (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID` (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures` (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel` (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures` (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel` (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel` (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax` (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum` (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady` (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify` (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `InterruptStatus` (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK` (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status` (RW).
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow` (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh` (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh` (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh` (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `SHMSel` (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// `SHMLenLow` (R).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// `SHMLenHigh` (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// `SHMBaseLow` (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// `SHMBaseHigh` (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// `QueueReset` (RW).
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// `ConfigGeneration` (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits (§2.1).
pub mod status {
    /// The guest found the device and recognised it as a virtio device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset
    /// (set by the device only).
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u8 = 128;
    /// Bits a driver may write.
    pub const DRIVER_BITS: u8 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED;
}

/// Feature bit (number) of `VIRTIO_F_VERSION_1`: the device and driver follow
/// the non-legacy interface. Offered by every device on this transport and
/// required for `FEATURES_OK`.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// `InterruptStatus` bit: a used buffer notification.
pub const INTERRUPT_USED_BUFFER: u32 = 1 << 0;
/// `InterruptStatus` bit: a configuration change notification.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 1 << 1;

/// What `SHMLen` and `SHMBase` read for a shared memory region that does not
/// exist (the spec's "-1").
pub const SHM_NONE: u64 = u64::MAX;

/// A shared memory region (§2.10) as the driver finds it: a range of guest
/// physical memory the VMM maps for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmRegion {
    /// Guest-physical address of the first byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a device provides to the [`VirtioMmio`] transport.
///
/// Offsets given to the configuration methods are relative to the start of
/// the configuration space, and the transport guarantees that
/// `offset + data.len() <= self.config_len()` and `data.len()` is 1, 2, 4 or 8.
pub trait VirtioBackend: Send {
    /// The virtio device ID (`DeviceID`); must not be 0.
    fn device_id(&self) -> u32;
    /// The vendor ID (`VendorID`).
    fn vendor_id(&self) -> u32;
    /// Offered feature bits. The transport always adds `VIRTIO_F_VERSION_1`.
    fn device_features(&self) -> u64;
    /// The shared memory region with this `shmid`, if any.
    fn shm_region(&self, _shmid: u32) -> Option<ShmRegion> {
        None
    }
    /// Size of the device-specific configuration space in bytes (at most
    /// `VIRTIO_MMIO_WINDOW - CONFIG_SPACE_OFFSET`; anything beyond is never
    /// reachable).
    fn config_len(&self) -> usize;
    /// Fills `data` from the configuration space at `offset`.
    fn read_config(&self, offset: usize, data: &mut [u8]);
    /// A driver write to the configuration space, made after `FEATURES_OK`
    /// with the `negotiated` features. Returns whether it was accepted; a
    /// refused write must leave the backend unchanged.
    fn write_config(&mut self, offset: usize, data: &[u8], negotiated: u64) -> bool;
    /// The driver reset the device: forget everything the driver set.
    fn reset(&mut self);
    /// The device status changed (not called for a reset; see
    /// [`Self::reset`]). `negotiated` is meaningful once `FEATURES_OK` is set.
    fn status_changed(&mut self, _status: u8, _negotiated: u64) {}
    /// The maximum sizes of the device's virtqueues, one per queue (each a
    /// power of two, at most 32768). Read once, when the transport is made.
    fn queue_max_sizes(&self) -> Vec<u16> {
        Vec::new()
    }
    /// The driver notified queue `index` (always an index into `queues`,
    /// after `DRIVER_OK`). The backend processes the queue's available
    /// buffers, on the notifying vCPU's thread, so it must bound its work
    /// and never block. Every queue field is guest-written: the backend must
    /// check a queue (e.g. [`virtio_queue::QueueT::is_valid`]) before using
    /// it. Returns whether the driver must be interrupted (used buffers were
    /// added and the driver did not suppress the notification).
    fn queue_notify(&mut self, _index: usize, _queues: &mut [Queue]) -> bool {
        false
    }
}

/// Counters of what happened on a virtio-mmio device. All are monotonic.
#[derive(Debug, Default)]
pub struct VirtioMmioMetrics {
    bad_accesses: AtomicU64,
    protocol_errors: AtomicU64,
    features_refused: AtomicU64,
    config_changes: AtomicU64,
    config_interrupts: AtomicU64,
    irq_errors: AtomicU64,
    resets: AtomicU64,
    queue_notifies: AtomicU64,
    used_interrupts: AtomicU64,
}

impl VirtioMmioMetrics {
    /// Accesses ignored for their size, offset or direction.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses.load(Ordering::Relaxed)
    }
    /// Well-formed accesses the state machine or the backend rejected.
    pub fn protocol_errors(&self) -> u64 {
        self.protocol_errors.load(Ordering::Relaxed)
    }
    /// `FEATURES_OK` writes refused because of the accepted features.
    pub fn features_refused(&self) -> u64 {
        self.features_refused.load(Ordering::Relaxed)
    }
    /// Host-side configuration changes (`ConfigGeneration` bumps).
    pub fn config_changes(&self) -> u64 {
        self.config_changes.load(Ordering::Relaxed)
    }
    /// Configuration change interrupts signalled.
    pub fn config_interrupts(&self) -> u64 {
        self.config_interrupts.load(Ordering::Relaxed)
    }
    /// Failures to signal the interrupt eventfd.
    pub fn irq_errors(&self) -> u64 {
        self.irq_errors.load(Ordering::Relaxed)
    }
    /// Device resets (status writes of 0).
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
    /// Queue notifications passed to the backend.
    pub fn queue_notifies(&self) -> u64 {
        self.queue_notifies.load(Ordering::Relaxed)
    }
    /// Used-buffer interrupts signalled.
    pub fn used_interrupts(&self) -> u64 {
        self.used_interrupts.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where an access lands in the window.
enum Target {
    /// A 4-byte, 4-aligned access to the register at this offset.
    Register(u64),
    /// An access of 1, 2, 4 or 8 bytes fully inside the configuration space,
    /// at this offset into it.
    Config(usize),
}

/// A virtio-mmio device: the transport state around a [`VirtioBackend`].
///
/// See the module documentation for the register semantics.
#[derive(Debug)]
pub struct VirtioMmio<B> {
    backend: B,
    interrupt: EventFdTrigger,
    metrics: Arc<VirtioMmioMetrics>,
    status: u8,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// Accepted feature bits 0..64.
    driver_features: u64,
    /// The driver wrote a non-zero word beyond bit 63, which no device here
    /// offers; `FEATURES_OK` is refused until a reset.
    driver_features_beyond: bool,
    shm_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: QueueRegisters,
}

impl<B: VirtioBackend> VirtioMmio<B> {
    /// A device in the reset state whose interrupt is `interrupt`.
    pub fn new(backend: B, interrupt: EventFdTrigger) -> Self {
        let queues = QueueRegisters::new(&backend.queue_max_sizes());
        Self {
            queues,
            backend,
            interrupt,
            metrics: Arc::new(VirtioMmioMetrics::default()),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond: false,
            shm_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably. After changing its configuration, call
    /// [`Self::notify_config_change`].
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The device's counters, shareable with a metrics reporter.
    pub fn metrics(&self) -> Arc<VirtioMmioMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The interrupt trigger (e.g. to clone its eventfd for an irqfd).
    pub fn interrupt(&self) -> &EventFdTrigger {
        &self.interrupt
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The offered features: the backend's plus `VIRTIO_F_VERSION_1`.
    pub fn offered_features(&self) -> u64 {
        self.backend.device_features() | (1 << VIRTIO_F_VERSION_1)
    }

    /// The negotiated features, once `FEATURES_OK` is set.
    pub fn negotiated_features(&self) -> Option<u64> {
        (self.status & status::FEATURES_OK != 0).then_some(self.driver_features)
    }

    /// The `InterruptStatus` register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The `ConfigGeneration` register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// The device's virtqueues as the driver configured them.
    pub fn queues(&self) -> &[Queue] {
        self.queues.queues()
    }

    /// Passes a `QueueNotify` for queue `value` to the backend and raises
    /// the used-buffer interrupt if it asks for one.
    fn notify_queue(&mut self, value: u32) {
        let live = self.status & status::DRIVER_OK != 0
            && self.status & (status::FAILED | status::DEVICE_NEEDS_RESET) == 0;
        let Some(index) = usize::try_from(value)
            .ok()
            .filter(|_| live && self.queues.exists(value))
        else {
            self.protocol_error();
            return;
        };
        VirtioMmioMetrics::bump(&self.metrics.queue_notifies);
        if self.backend.queue_notify(index, self.queues.queues_mut()) {
            self.interrupt_status |= INTERRUPT_USED_BUFFER;
            VirtioMmioMetrics::bump(&self.metrics.used_interrupts);
            if self.interrupt.trigger().is_err() {
                VirtioMmioMetrics::bump(&self.metrics.irq_errors);
            }
        }
    }

    /// Tells the driver the configuration space changed: bumps
    /// `ConfigGeneration` and, once the driver has set `DRIVER_OK`, raises the
    /// configuration change interrupt.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        VirtioMmioMetrics::bump(&self.metrics.config_changes);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt_status |= INTERRUPT_CONFIG_CHANGE;
            VirtioMmioMetrics::bump(&self.metrics.config_interrupts);
            if self.interrupt.trigger().is_err() {
                VirtioMmioMetrics::bump(&self.metrics.irq_errors);
            }
        }
    }

    /// Sets `DEVICE_NEEDS_RESET` (the device hit an error it cannot recover
    /// from) and notifies the driver as for a configuration change. No effect
    /// if it is already set.
    pub fn set_needs_reset(&mut self) {
        if self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        self.status |= status::DEVICE_NEEDS_RESET;
        self.backend
            .status_changed(self.status, self.driver_features);
        self.notify_config_change();
    }

    /// Classifies an access of `len` bytes at `offset`.
    fn target(&self, offset: u64, len: usize) -> Option<Target> {
        let end = offset.checked_add(u64::try_from(len).ok()?)?;
        if end > VIRTIO_MMIO_WINDOW {
            return None;
        }
        if offset < CONFIG_SPACE_OFFSET {
            return (len == 4 && offset & 3 == 0).then_some(Target::Register(offset));
        }
        // Both fit in usize: they are below the window size.
        let start = usize::try_from(offset - CONFIG_SPACE_OFFSET).ok()?;
        let end = usize::try_from(end - CONFIG_SPACE_OFFSET).ok()?;
        (matches!(len, 1 | 2 | 4 | 8) && end <= self.backend.config_len())
            .then_some(Target::Config(start))
    }

    fn bad_access(&self) {
        VirtioMmioMetrics::bump(&self.metrics.bad_accesses);
    }

    fn protocol_error(&self) {
        VirtioMmioMetrics::bump(&self.metrics.protocol_errors);
    }

    fn shm(&self) -> Option<ShmRegion> {
        self.backend.shm_region(self.shm_sel)
    }

    /// The value of a readable register; `None` for write-only registers and
    /// holes.
    fn read_register(&self, reg: u64) -> Option<u32> {
        let word = |value: u64, high: bool| {
            // Truncation is the point: one half of a 64-bit value.
            ((if high { value >> 32 } else { value }) & 0xffff_ffff) as u32
        };
        let value = match reg {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.backend.device_id(),
            regs::VENDOR_ID => self.backend.vendor_id(),
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => word(self.offered_features(), false),
                1 => word(self.offered_features(), true),
                _ => 0,
            },
            regs::QUEUE_NUM_MAX | regs::QUEUE_READY => self.queues.read(reg)?,
            // VIRTIO_F_RING_RESET is never offered: no queue is being reset.
            regs::QUEUE_RESET => 0,
            regs::INTERRUPT_STATUS => self.interrupt_status,
            regs::STATUS => u32::from(self.status),
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => word(
                self.shm().map_or(SHM_NONE, |r| r.len),
                reg == regs::SHM_LEN_HIGH,
            ),
            regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => word(
                self.shm().map_or(SHM_NONE, |r| r.base),
                reg == regs::SHM_BASE_HIGH,
            ),
            regs::CONFIG_GENERATION => self.config_generation,
            _ => return None,
        };
        Some(value)
    }

    /// Applies a write to a register. Returns `false` for read-only
    /// registers and holes.
    fn write_register(&mut self, reg: u64, value: u32) -> bool {
        match reg {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::QUEUE_SEL => {
                // Selecting a queue is harmless at any time.
                let _ = self.queues.write(reg, value);
            }
            _ if QueueRegisters::is_writable(reg) => {
                let configurable =
                    self.status & status::FEATURES_OK != 0 && self.status & status::FAILED == 0;
                if !configurable || self.queues.write(reg, value).is_err() {
                    self.protocol_error();
                }
            }
            regs::QUEUE_NOTIFY => self.notify_queue(value),
            regs::QUEUE_RESET => self.protocol_error(),
            regs::INTERRUPT_ACK => self.interrupt_status &= !value,
            regs::STATUS => self.write_status(value),
            regs::SHM_SEL => self.shm_sel = value,
            _ => return false,
        }
        true
    }

    fn write_driver_features(&mut self, value: u32) {
        // §3.1.1: the driver must not accept new features after FEATURES_OK.
        if self.status & (status::FEATURES_OK | status::FAILED) != 0 {
            self.protocol_error();
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32);
            }
            // Nothing is offered beyond bit 63: accepting any of it is invalid.
            _ => self.driver_features_beyond |= value != 0,
        }
    }

    /// Whether the accepted features allow `FEATURES_OK`.
    fn features_acceptable(&self) -> bool {
        !self.driver_features_beyond
            && self.driver_features & !self.offered_features() == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn reset(&mut self) {
        VirtioMmioMetrics::bump(&self.metrics.resets);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond = false;
        self.shm_sel = 0;
        self.interrupt_status = 0;
        self.queues.reset();
        self.backend.reset();
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let Ok(value) = u8::try_from(value) else {
            self.protocol_error();
            return;
        };
        let device_bits = self.status & status::DEVICE_NEEDS_RESET;
        let current = self.status & !status::DEVICE_NEEDS_RESET;
        let wanted = value & !status::DEVICE_NEEDS_RESET;
        if wanted & !status::DRIVER_BITS != 0 || wanted & current != current {
            // An undefined bit, or an attempt to clear one.
            self.protocol_error();
            return;
        }
        if current & status::FAILED != 0 {
            if wanted != current {
                self.protocol_error();
            }
            return;
        }
        let mut next = current | (wanted & status::FAILED);
        // Each step needs the one before it; stop at the first that is missing.
        let steps = [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, needs) in steps {
            if wanted & bit == 0 || next & bit != 0 {
                continue;
            }
            if needs != 0 && next & needs == 0 {
                self.protocol_error();
                break;
            }
            if bit == status::FEATURES_OK && !self.features_acceptable() {
                VirtioMmioMetrics::bump(&self.metrics.features_refused);
                break;
            }
            next |= bit;
        }
        let next = next | device_bits;
        if next != self.status {
            self.status = next;
            self.backend.status_changed(next, self.driver_features);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        // §3.1.1: the driver may read, but must not write, the configuration
        // space before FEATURES_OK.
        let writable = self.status & status::FEATURES_OK != 0 && self.status & status::FAILED == 0;
        if !writable
            || !self
                .backend
                .write_config(offset, data, self.driver_features)
        {
            self.protocol_error();
        }
    }
}

impl<B: VirtioBackend> BusDevice for VirtioMmio<B> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset, data.len()) {
            Some(Target::Register(reg)) => match (self.read_register(reg), data.len()) {
                (Some(value), 4) => data.copy_from_slice(&value.to_le_bytes()),
                _ => {
                    data.fill(0);
                    self.bad_access();
                }
            },
            Some(Target::Config(off)) => self.backend.read_config(off, data),
            None => {
                data.fill(0);
                self.bad_access();
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match self.target(offset, data.len()) {
            Some(Target::Register(reg)) => {
                let written = <[u8; 4]>::try_from(data)
                    .is_ok_and(|bytes| self.write_register(reg, u32::from_le_bytes(bytes)));
                if !written {
                    self.bad_access();
                }
            }
            Some(Target::Config(off)) => self.write_config(off, data),
            None => self.bad_access(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend with no features, no regions and no configuration space.
    #[derive(Debug)]
    struct Bare;

    impl VirtioBackend for Bare {
        fn device_id(&self) -> u32 {
            0x42
        }
        fn vendor_id(&self) -> u32 {
            0
        }
        fn device_features(&self) -> u64 {
            0
        }
        fn config_len(&self) -> usize {
            0
        }
        fn read_config(&self, _offset: usize, data: &mut [u8]) {
            data.fill(0x77);
        }
        fn write_config(&mut self, _offset: usize, _data: &[u8], _negotiated: u64) -> bool {
            true
        }
        fn reset(&mut self) {}
    }

    fn rd(dev: &mut VirtioMmio<Bare>, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xa5; len];
        dev.read(offset, &mut data);
        data
    }

    #[test]
    fn bare_backend_offers_version_1_only_and_has_no_regions_or_config() {
        let mut dev = VirtioMmio::new(Bare, EventFdTrigger::new().unwrap());
        assert_eq!(dev.offered_features(), 1 << VIRTIO_F_VERSION_1);
        assert_eq!(rd(&mut dev, regs::DEVICE_ID, 4), 0x42u32.to_le_bytes());
        for shmid in [0u32, 1, u32::MAX] {
            dev.write(regs::SHM_SEL, &shmid.to_le_bytes());
            for reg in [
                regs::SHM_LEN_LOW,
                regs::SHM_LEN_HIGH,
                regs::SHM_BASE_LOW,
                regs::SHM_BASE_HIGH,
            ] {
                assert_eq!(rd(&mut dev, reg, 4), [0xff; 4]);
            }
        }
        // The backend is never asked about an empty configuration space.
        for len in [1, 2, 4, 8] {
            assert_eq!(rd(&mut dev, CONFIG_SPACE_OFFSET, len), vec![0; len]);
            dev.write(CONFIG_SPACE_OFFSET, &vec![1; len]);
        }
        assert_eq!(dev.metrics().bad_accesses(), 8);
        // A configuration change before DRIVER_OK raises no interrupt.
        dev.notify_config_change();
        assert_eq!(dev.config_generation(), 1);
        assert_eq!(dev.interrupt_status(), 0);
        assert_eq!(dev.metrics().config_interrupts(), 0);
    }
}
