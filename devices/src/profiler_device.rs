//! The Mirrorball profiler device: how a guest finds the profiler's shared
//! region and talks to the host sampler.
//!
//! This module owns [`ProfilerDevice`], a [`VirtioMmio`] device (virtio 1.2,
//! virtio-mmio version 2) with:
//!
//! * **one shared memory region** (§2.10), shmid [`SHMID_GUEST_REGION`] (0):
//!   the profiler's guest region, a host memfd the VMM maps into guest
//!   physical memory as its own memory slot. The guest driver finds its
//!   address and length through the `SHMSel`/`SHMLen`/`SHMBase` registers.
//!   The guest registers its tasks in that region's task table, so nothing
//!   else has to travel between guest and host as messages;
//! * **no virtqueues**: guest-to-host control goes through the
//!   device-specific configuration space instead (the issue allows "a
//!   virtqueue or device registers"). The one thing the guest asks for, a
//!   sampling period, is a single 64-bit value, so a queue (descriptor
//!   rings, buffer parsing, used-buffer interrupts) would add hostile-input
//!   surface and code for nothing. `QueueNumMax` reads 0 for every queue;
//! * the configuration change interrupt, raised when the host changes the
//!   configuration (e.g. [`ProfilerDevice::update_default_period`]).
//!
//! A note on the spec: §2.10 says a device must not use shared memory regions
//! "to control the operation of the device, nor to stream data". The
//! profiler's region carries the guest's task table and is read by the host
//! sampler; this device is our own (not an OASIS-registered type), so we
//! accept that deviation knowingly. Control of the device itself stays in the
//! registers and configuration space.
//!
//! # Identity and features
//!
//! * `DeviceID` [`PROFILER_DEVICE_ID`] = 0x4d42 (`'M' 'B'`), far above the
//!   IDs OASIS has assigned; `VendorID` [`PROFILER_VENDOR_ID`] = 0x4c42_524d
//!   (the bytes `"MRBL"` in memory order, like `MagicValue` spells `"virt"`).
//! * Offered features: `VIRTIO_F_VERSION_1` (bit 32; the driver must accept
//!   it or `FEATURES_OK` is refused) and [`PROFILER_F_PERIOD_CONTROL`] (bit
//!   0): the driver may write `requested_period_ns`. A driver that does not
//!   accept bit 0 can still read the configuration but its writes are
//!   refused.
//!
//! # Configuration space (from offset 0x100 of the window)
//!
//! [`ProfilerConfigSpace`], little endian, [`config::SIZE`] = 0x38 bytes:
//!
//! | offset | size | field                 | access | meaning |
//! |--------|------|-----------------------|--------|---------|
//! | 0x00   | 2    | `abi_version_major`   | RO     | ABI major version of the shared region |
//! | 0x02   | 2    | `abi_version_minor`   | RO     | ABI minor version of the shared region |
//! | 0x04   | 4    | `vcpu_count`          | RO     | number of vCPUs |
//! | 0x08   | 8    | `default_period_ns`   | RO     | host's sampling period (changes raise a config interrupt) |
//! | 0x10   | 8    | `requested_period_ns` | RW     | guest's requested period, 0 = none; reads back the clamped value in effect |
//! | 0x18   | 8    | `host_region_id`      | RO     | identifies the host-only region file, to pair the two |
//! | 0x20   | 4    | `flags`               | RO     | bit 0 [`CONFIG_FLAG_SAMPLER_ACTIVE`]; other bits 0 |
//! | 0x24   | 4    | `reserved`            | RO     | 0 |
//! | 0x28   | 8    | `min_period_ns`       | RO     | [`MIN_PERIOD_NS`] |
//! | 0x30   | 8    | `max_period_ns`       | RO     | [`MAX_PERIOD_NS`] |
//! | 0x38   | 4    | `switch_doorbell`     | WO     | task-switch doorbell (reads 0), see below |
//! | 0x3c   | 4    | `reserved2`           | RO     | 0 |
//!
//! Any 1, 2, 4 or 8-byte access that lies inside these 0x40 bytes is served
//! (unaligned too); everything past them is a bad access (see
//! [`crate::virtio_mmio`]).
//!
//! ## Writing `requested_period_ns`
//!
//! Only bytes of `requested_period_ns` are writable, only after
//! `FEATURES_OK` and only with [`PROFILER_F_PERIOD_CONTROL`] negotiated. A
//! write lands in a staging copy of the field; the value takes effect when a
//! write covers the field's last byte (offset 0x17). Linux's
//! `virtio_cwrite64` on virtio-mmio issues two 32-bit writes, low word then
//! high word, so the host sees one update and never a torn value; an 8-byte
//! write takes effect at once. The committed value is 0 (no request: the host
//! uses its default) or clamped to [[`MIN_PERIOD_NS`], [`MAX_PERIOD_NS`]]
//! (100 µs to 60 s: at most 10 kHz, so a guest cannot make the host sampler
//! spin; the issue needs ≥ 1 kHz). Reads return the committed value.
//!
//! ## Writing `switch_doorbell`
//!
//! With [`PROFILER_F_SWITCH_DOORBELL`] (bit 1) negotiated, a 4-byte write of a vCPU index to
//! `switch_doorbell` announces that this vCPU is about to switch tasks: the driver writes it
//! from its context-switch hook *before* it rewrites the vCPU's slot in the guest region for the
//! incoming task. The host then closes the vCPU's open accounting interval at that moment and
//! charges it to the task the slot still names (exact attribution, see `profiler/ABI.md`). The
//! write exits to the VMM on the vCPU thread, which reads its own counters there. Writes of
//! another width, without the feature, or naming no vCPU are refused (counted as protocol errors);
//! accepted ones are counted in [`ProfilerControl::switch_doorbells`].
//!
//! # Host side
//!
//! The sampler thread must not take the device lock (vCPU threads hold it on
//! every access), so the device publishes what the guest asked for in a
//! [`ProfilerControl`] of atomics ([`ProfilerDevice::control`]): the device
//! status, whether the driver is ready, the requested and default periods,
//! and a change counter. The VMM can poll it or, with
//! [`ProfilerDevice::set_control_notifier`], get an eventfd signalled on
//! every change.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;
use crate::virtio_mmio::{status, ShmRegion, VirtioBackend, VirtioMmio, VirtioMmioMetrics};

pub use crate::virtio_mmio::VIRTIO_MMIO_WINDOW;

/// The profiler's virtio device ID (`'M' 'B'`).
pub const PROFILER_DEVICE_ID: u32 = 0x4d42;
/// The profiler's virtio vendor ID: `"MRBL"` as little-endian bytes.
pub const PROFILER_VENDOR_ID: u32 = 0x4c42_524d;
/// Feature bit (number): the driver may request a sampling period through
/// `requested_period_ns`.
pub const PROFILER_F_PERIOD_CONTROL: u32 = 0;
/// Feature bit (number): the driver may announce task switches through `switch_doorbell`.
pub const PROFILER_F_SWITCH_DOORBELL: u32 = 1;
/// The shmid of the profiler's guest region.
pub const SHMID_GUEST_REGION: u32 = 0;
/// `flags` bit: the host sampler is currently taking samples.
pub const CONFIG_FLAG_SAMPLER_ACTIVE: u32 = 1 << 0;
/// Shortest period a guest may request: 100 µs (10 kHz).
pub const MIN_PERIOD_NS: u64 = 100_000;
/// Longest period a guest may request: 60 s.
pub const MAX_PERIOD_NS: u64 = 60_000_000_000;
/// The default sampling period the issue asks for: 50 ms (20 Hz).
pub const DEFAULT_PERIOD_NS: u64 = 50_000_000;

/// Byte offsets and size of [`ProfilerConfigSpace`] in the configuration
/// space.
pub mod config {
    /// `abi_version_major: u16`.
    pub const ABI_VERSION_MAJOR: usize = 0x00;
    /// `abi_version_minor: u16`.
    pub const ABI_VERSION_MINOR: usize = 0x02;
    /// `vcpu_count: u32`.
    pub const VCPU_COUNT: usize = 0x04;
    /// `default_period_ns: u64`.
    pub const DEFAULT_PERIOD_NS: usize = 0x08;
    /// `requested_period_ns: u64`, the only writable field.
    pub const REQUESTED_PERIOD_NS: usize = 0x10;
    /// `host_region_id: u64`.
    pub const HOST_REGION_ID: usize = 0x18;
    /// `flags: u32`.
    pub const FLAGS: usize = 0x20;
    /// `reserved: u32`, reads 0.
    pub const RESERVED: usize = 0x24;
    /// `min_period_ns: u64`.
    pub const MIN_PERIOD_NS: usize = 0x28;
    /// `max_period_ns: u64`.
    pub const MAX_PERIOD_NS: usize = 0x30;
    /// `switch_doorbell: u32`, write-only (reads 0).
    pub const SWITCH_DOORBELL: usize = 0x38;
    /// `reserved2: u32`, reads 0.
    pub const RESERVED2: usize = 0x3c;
    /// Size of the configuration space.
    pub const SIZE: usize = 0x40;
}

/// The device-specific configuration space, as the guest sees it (little
/// endian, offsets in [`config`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProfilerConfigSpace {
    /// ABI major version of the shared region.
    pub abi_version_major: u16,
    /// ABI minor version of the shared region.
    pub abi_version_minor: u16,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// The host's sampling period.
    pub default_period_ns: u64,
    /// The guest's requested period in effect (clamped), 0 if none.
    pub requested_period_ns: u64,
    /// Identifies the host-only region file.
    pub host_region_id: u64,
    /// [`CONFIG_FLAG_SAMPLER_ACTIVE`].
    pub flags: u32,
    /// Always 0.
    pub reserved: u32,
    /// [`MIN_PERIOD_NS`].
    pub min_period_ns: u64,
    /// [`MAX_PERIOD_NS`].
    pub max_period_ns: u64,
    /// Task-switch doorbell; always reads 0.
    pub switch_doorbell: u32,
    /// Always 0.
    pub reserved2: u32,
}

// The documented offsets are the `repr(C)` layout.
const _: () = {
    use std::mem::{offset_of, size_of};
    type C = ProfilerConfigSpace;
    assert!(offset_of!(C, abi_version_major) == config::ABI_VERSION_MAJOR);
    assert!(offset_of!(C, abi_version_minor) == config::ABI_VERSION_MINOR);
    assert!(offset_of!(C, vcpu_count) == config::VCPU_COUNT);
    assert!(offset_of!(C, default_period_ns) == config::DEFAULT_PERIOD_NS);
    assert!(offset_of!(C, requested_period_ns) == config::REQUESTED_PERIOD_NS);
    assert!(offset_of!(C, host_region_id) == config::HOST_REGION_ID);
    assert!(offset_of!(C, flags) == config::FLAGS);
    assert!(offset_of!(C, reserved) == config::RESERVED);
    assert!(offset_of!(C, min_period_ns) == config::MIN_PERIOD_NS);
    assert!(offset_of!(C, max_period_ns) == config::MAX_PERIOD_NS);
    assert!(offset_of!(C, switch_doorbell) == config::SWITCH_DOORBELL);
    assert!(offset_of!(C, reserved2) == config::RESERVED2);
    assert!(size_of::<C>() == config::SIZE);
};

impl ProfilerConfigSpace {
    /// The little-endian bytes the guest reads.
    pub fn to_le_bytes(&self) -> [u8; config::SIZE] {
        let mut out = [0u8; config::SIZE];
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(
            config::ABI_VERSION_MAJOR,
            &self.abi_version_major.to_le_bytes(),
        );
        put(
            config::ABI_VERSION_MINOR,
            &self.abi_version_minor.to_le_bytes(),
        );
        put(config::VCPU_COUNT, &self.vcpu_count.to_le_bytes());
        put(
            config::DEFAULT_PERIOD_NS,
            &self.default_period_ns.to_le_bytes(),
        );
        put(
            config::REQUESTED_PERIOD_NS,
            &self.requested_period_ns.to_le_bytes(),
        );
        put(config::HOST_REGION_ID, &self.host_region_id.to_le_bytes());
        put(config::FLAGS, &self.flags.to_le_bytes());
        put(config::RESERVED, &self.reserved.to_le_bytes());
        put(config::MIN_PERIOD_NS, &self.min_period_ns.to_le_bytes());
        put(config::MAX_PERIOD_NS, &self.max_period_ns.to_le_bytes());
        put(config::SWITCH_DOORBELL, &self.switch_doorbell.to_le_bytes());
        put(config::RESERVED2, &self.reserved2.to_le_bytes());
        out
    }
}

/// A guest-requested period as it takes effect: 0 stays 0 (no request),
/// anything else is clamped to [[`MIN_PERIOD_NS`], [`MAX_PERIOD_NS`]].
pub fn clamp_requested_period(ns: u64) -> u64 {
    if ns == 0 {
        0
    } else {
        ns.clamp(MIN_PERIOD_NS, MAX_PERIOD_NS)
    }
}

/// How the VMM sets up a [`ProfilerDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfilerDeviceConfig {
    /// Guest-physical address where the VMM maps the guest region.
    pub shm_guest_base: u64,
    /// Length of the guest region in bytes. A length of 0, or one that makes
    /// the region end past the 64-bit address space, exposes no region
    /// (shmid 0 then reads as absent).
    pub shm_len: u64,
    /// Number of vCPUs, reported in the configuration space.
    pub vcpu_count: u32,
    /// The host's sampling period, reported as-is (not clamped: it is the
    /// host's own choice).
    pub default_period_ns: u64,
    /// Identifies the host-only region file.
    pub host_region_id: u64,
    /// ABI (major, minor) version of the shared region.
    pub abi_version: (u16, u16),
}

/// Where announced task switches go (the VMM's per-vCPU accounting). Called on the vCPU
/// thread that exited for the doorbell; must not block.
pub trait TaskSwitchSink: Send + Sync {
    /// vCPU `vcpu` is about to switch tasks (`vcpu` is guest-claimed; ignore it if unknown).
    fn task_switch(&self, vcpu: usize);

    /// Whether announcements are wanted now: the device offers
    /// [`PROFILER_F_SWITCH_DOORBELL`] only then.
    fn wanted(&self) -> bool {
        true
    }
}

/// A [`TaskSwitchSink`] as [`ProfilerControl`] holds it.
struct SwitchSink(Arc<dyn TaskSwitchSink>);

impl std::fmt::Debug for SwitchSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskSwitchSink")
    }
}

/// What the guest asked for, readable by the host sampler thread without the
/// device lock. All fields are atomics updated by the device.
#[derive(Debug, Default)]
pub struct ProfilerControl {
    status: AtomicU8,
    requested_period_ns: AtomicU64,
    default_period_ns: AtomicU64,
    changes: AtomicU64,
    notify_errors: AtomicU64,
    switch_doorbells: AtomicU64,
    switch_sink: std::sync::OnceLock<SwitchSink>,
}

impl ProfilerControl {
    /// Sends every accepted `switch_doorbell` write to `sink` (set once; later calls are
    /// ignored).
    pub fn set_switch_sink(&self, sink: Arc<dyn TaskSwitchSink>) {
        let _ = self.switch_sink.set(SwitchSink(sink));
    }

    /// Accepted `switch_doorbell` writes so far.
    pub fn switch_doorbells(&self) -> u64 {
        self.switch_doorbells.load(Ordering::Relaxed)
    }

    /// The device status byte (bits in [`crate::virtio_mmio::status`]).
    pub fn status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    /// Whether the driver is up: `DRIVER_OK` set, neither `FAILED` nor
    /// `DEVICE_NEEDS_RESET`.
    pub fn driver_ok(&self) -> bool {
        status_is_driver_ok(self.status())
    }

    /// The period the guest requested (clamped), if it requested one. Cleared
    /// by a device reset.
    pub fn requested_period_ns(&self) -> Option<u64> {
        Some(self.requested_period_ns.load(Ordering::Acquire)).filter(|&ns| ns != 0)
    }

    /// The host's default period.
    pub fn default_period_ns(&self) -> u64 {
        self.default_period_ns.load(Ordering::Acquire)
    }

    /// The period the sampler should use: the guest's request while the
    /// driver is up ([`Self::driver_ok`]), the default otherwise.
    pub fn effective_period_ns(&self) -> u64 {
        match self.requested_period_ns() {
            Some(ns) if self.driver_ok() => ns,
            _ => self.default_period_ns(),
        }
    }

    /// Bumped after every change of the status or the requested period; a
    /// poller can compare it with the value it last saw.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Failures to signal the control notifier eventfd.
    pub fn notify_errors(&self) -> u64 {
        self.notify_errors.load(Ordering::Relaxed)
    }
}

fn status_is_driver_ok(s: u8) -> bool {
    s & status::DRIVER_OK != 0 && s & (status::FAILED | status::DEVICE_NEEDS_RESET) == 0
}

/// The profiler's side of the transport: configuration space and region.
#[derive(Debug)]
struct ProfilerBackend {
    space: ProfilerConfigSpace,
    region: Option<ShmRegion>,
    /// Bytes of `requested_period_ns` written but not yet committed.
    staged_period: [u8; 8],
    control: Arc<ProfilerControl>,
    notifier: Option<EventFdTrigger>,
}

impl ProfilerBackend {
    /// Publishes a control change and wakes the notifier, if any.
    fn control_changed(&self) {
        self.control.changes.fetch_add(1, Ordering::AcqRel);
        if let Some(notifier) = &self.notifier {
            if notifier.trigger().is_err() {
                self.control.notify_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A write to `switch_doorbell`: a 4-byte vCPU index, with the feature negotiated.
    fn switch_doorbell(&self, data: &[u8], negotiated: u64) -> bool {
        if negotiated & (1 << PROFILER_F_SWITCH_DOORBELL) == 0 {
            return false;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return false;
        };
        let vcpu = u32::from_le_bytes(bytes);
        if vcpu >= self.space.vcpu_count {
            return false;
        }
        self.control
            .switch_doorbells
            .fetch_add(1, Ordering::Relaxed);
        if let Some(sink) = self.control.switch_sink.get() {
            sink.0.task_switch(vcpu as usize);
        }
        true
    }

    fn set_requested(&mut self, ns: u64) {
        self.space.requested_period_ns = ns;
        self.control
            .requested_period_ns
            .store(ns, Ordering::Release);
        self.control_changed();
    }
}

impl VirtioBackend for ProfilerBackend {
    fn device_id(&self) -> u32 {
        PROFILER_DEVICE_ID
    }

    fn vendor_id(&self) -> u32 {
        PROFILER_VENDOR_ID
    }

    fn device_features(&self) -> u64 {
        let doorbell = self.control.switch_sink.get().is_some_and(|s| s.0.wanted());
        (1 << PROFILER_F_PERIOD_CONTROL) | (u64::from(doorbell) << PROFILER_F_SWITCH_DOORBELL)
    }

    fn shm_region(&self, shmid: u32) -> Option<ShmRegion> {
        if shmid == SHMID_GUEST_REGION {
            self.region
        } else {
            None
        }
    }

    fn config_len(&self) -> usize {
        config::SIZE
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let bytes = self.space.to_le_bytes();
        match offset
            .checked_add(data.len())
            .and_then(|end| bytes.get(offset..end))
        {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8], negotiated: u64) -> bool {
        const FIELD: usize = config::REQUESTED_PERIOD_NS;
        if offset == config::SWITCH_DOORBELL {
            return self.switch_doorbell(data, negotiated);
        }
        if negotiated & (1 << PROFILER_F_PERIOD_CONTROL) == 0 {
            return false;
        }
        let Some(end) = offset.checked_add(data.len()) else {
            return false;
        };
        if offset < FIELD || end > FIELD + 8 {
            return false;
        }
        let Some(staged) = self.staged_period.get_mut(offset - FIELD..end - FIELD) else {
            return false;
        };
        staged.copy_from_slice(data);
        if end == FIELD + 8 {
            let ns = clamp_requested_period(u64::from_le_bytes(self.staged_period));
            self.set_requested(ns);
        }
        true
    }

    fn reset(&mut self) {
        self.staged_period = [0; 8];
        self.space.requested_period_ns = 0;
        self.control.requested_period_ns.store(0, Ordering::Release);
        self.control.status.store(0, Ordering::Release);
        self.control_changed();
    }

    fn status_changed(&mut self, status: u8, _negotiated: u64) {
        self.control.status.store(status, Ordering::Release);
        self.control_changed();
    }
}

/// The profiler device; see the module documentation.
///
/// Insert it on the MMIO bus with a [`VIRTIO_MMIO_WINDOW`]-byte range, and
/// describe it to the guest (e.g. `virtio_mmio.device=4K@<base>:<irq>` on the
/// Linux command line).
#[derive(Debug)]
pub struct ProfilerDevice {
    inner: VirtioMmio<ProfilerBackend>,
}

impl ProfilerDevice {
    /// A device in the reset state. `interrupt` is signalled for
    /// configuration change interrupts (register a clone of its eventfd as
    /// the irqfd of the device's GSI).
    pub fn new(config: ProfilerDeviceConfig, interrupt: EventFdTrigger) -> Self {
        let region = (config.shm_len > 0
            && config.shm_guest_base.checked_add(config.shm_len).is_some())
        .then_some(ShmRegion {
            base: config.shm_guest_base,
            len: config.shm_len,
        });
        let control = Arc::new(ProfilerControl::default());
        control
            .default_period_ns
            .store(config.default_period_ns, Ordering::Release);
        let (major, minor) = config.abi_version;
        let backend = ProfilerBackend {
            space: ProfilerConfigSpace {
                abi_version_major: major,
                abi_version_minor: minor,
                vcpu_count: config.vcpu_count,
                default_period_ns: config.default_period_ns,
                requested_period_ns: 0,
                host_region_id: config.host_region_id,
                flags: 0,
                reserved: 0,
                min_period_ns: MIN_PERIOD_NS,
                max_period_ns: MAX_PERIOD_NS,
                switch_doorbell: 0,
                reserved2: 0,
            },
            region,
            staged_period: [0; 8],
            control,
            notifier: None,
        };
        Self {
            inner: VirtioMmio::new(backend, interrupt),
        }
    }

    /// Signals `notifier` whenever [`ProfilerControl`] changes (status or
    /// requested period), e.g. to wake the sampler thread.
    pub fn set_control_notifier(&mut self, notifier: EventFdTrigger) {
        self.inner.backend_mut().notifier = Some(notifier);
    }

    /// The shared state the sampler thread reads without the device lock.
    pub fn control(&self) -> Arc<ProfilerControl> {
        Arc::clone(&self.inner.backend().control)
    }

    /// The transport's counters (bad accesses, protocol errors, interrupts).
    pub fn metrics(&self) -> Arc<VirtioMmioMetrics> {
        self.inner.metrics()
    }

    /// The interrupt trigger.
    pub fn interrupt(&self) -> &EventFdTrigger {
        self.inner.interrupt()
    }

    /// The period the guest requested (clamped), if any.
    pub fn requested_period_ns(&self) -> Option<u64> {
        self.inner.backend().control.requested_period_ns()
    }

    /// Whether the driver is up (see [`ProfilerControl::driver_ok`]).
    pub fn driver_ok(&self) -> bool {
        status_is_driver_ok(self.inner.status())
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.inner.status()
    }

    /// The negotiated features, once `FEATURES_OK` is set.
    pub fn negotiated_features(&self) -> Option<u64> {
        self.inner.negotiated_features()
    }

    /// The `InterruptStatus` register.
    pub fn interrupt_status(&self) -> u32 {
        self.inner.interrupt_status()
    }

    /// The `ConfigGeneration` register.
    pub fn config_generation(&self) -> u32 {
        self.inner.config_generation()
    }

    /// The configuration space as the guest currently reads it.
    pub fn config_space(&self) -> ProfilerConfigSpace {
        self.inner.backend().space
    }

    /// The guest region (shmid 0), if one is exposed.
    pub fn shm_region(&self) -> Option<ShmRegion> {
        self.inner.backend().region
    }

    /// Changes the host's default period: bumps `ConfigGeneration` and, once
    /// the driver is up, raises the configuration change interrupt. No effect
    /// if the period is unchanged.
    pub fn update_default_period(&mut self, ns: u64) {
        let backend = self.inner.backend_mut();
        if backend.space.default_period_ns == ns {
            return;
        }
        backend.space.default_period_ns = ns;
        backend
            .control
            .default_period_ns
            .store(ns, Ordering::Release);
        self.inner.notify_config_change();
    }

    /// Sets or clears [`CONFIG_FLAG_SAMPLER_ACTIVE`], notifying the driver as
    /// for any configuration change. No effect if unchanged.
    pub fn set_sampler_active(&mut self, active: bool) {
        let backend = self.inner.backend_mut();
        let flags = if active {
            backend.space.flags | CONFIG_FLAG_SAMPLER_ACTIVE
        } else {
            backend.space.flags & !CONFIG_FLAG_SAMPLER_ACTIVE
        };
        if flags == backend.space.flags {
            return;
        }
        backend.space.flags = flags;
        self.inner.notify_config_change();
    }

    /// Sets `DEVICE_NEEDS_RESET` (e.g. the host lost the shared region) and
    /// notifies the driver; [`Self::driver_ok`] is false until the guest
    /// resets and re-initialises the device.
    pub fn set_needs_reset(&mut self) {
        self.inner.set_needs_reset();
    }
}

impl ProfilerDevice {
    /// The transport and what the guest set, for a snapshot.
    pub fn state(&self) -> crate::state::ProfilerDeviceState {
        let backend = self.inner.backend();
        crate::state::ProfilerDeviceState {
            transport: self.inner.transport_state(),
            requested_period_ns: backend.space.requested_period_ns,
            staged_period: backend.staged_period,
        }
    }

    /// Loads a saved state. The configuration the VMM gave this device (ABI, vCPUs, default
    /// period, host region id, sampler flag) stays this device's own.
    pub fn restore(
        &mut self,
        state: &crate::state::ProfilerDeviceState,
    ) -> Result<(), crate::state::StateError> {
        let ns = state.requested_period_ns;
        if clamp_requested_period(ns) != ns {
            return Err(crate::state::StateError::new(
                "profiler device",
                "requested period out of range",
            ));
        }
        self.inner
            .restore_transport("profiler device", &state.transport)?;
        let backend = self.inner.backend_mut();
        backend.staged_period = state.staged_period;
        backend.space.requested_period_ns = ns;
        backend
            .control
            .requested_period_ns
            .store(ns, Ordering::Release);
        backend.control_changed();
        Ok(())
    }
}

impl BusDevice for ProfilerDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.inner.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.inner.write(offset, data);
    }
}

#[cfg(test)]
mod tests;
