//! The devices of a Linux VM (serial console, i8042, RTC) on their buses, and the exit handler that
//! routes vCPU port and MMIO exits to them. Accesses no device claims are counted and ignored.
use std::sync::{Arc, Mutex};

use mirrorball_devices::bus::{Bus, BusError};
use mirrorball_devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use mirrorball_devices::rtc::{Rtc, RTC_PORT_BASE, RTC_PORT_LEN};
use mirrorball_devices::serial::watch::{SerialWatch, WatchedWriter};
use mirrorball_devices::serial::{
    SerialDevice, SerialWriter, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN,
};
use mirrorball_devices::trigger::EventFdTrigger;
use mirrorball_devices::{ProfilerControl, ProfilerDevice, ProfilerDeviceConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::platform::MmioSlot;
use crate::vstate::vcpu::{ExitHandler, VcpuAction};
use crate::vstate::vm::Vm;

/// Errors creating or wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created or cloned.
    #[error("cannot create a device eventfd: {0}")]
    EventFd(std::io::Error),
    /// The serial device failed to initialise.
    #[error("cannot create the serial port: {0}")]
    Serial(mirrorball_devices::serial::SerialError),
    /// Two devices overlap on a bus.
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    /// The copy-on-write disk's files.
    #[error(transparent)]
    Disk(#[from] mirrorball_devices::virtio_blk::disk::DiskError),
    /// KVM refused a device interrupt's irqfd.
    #[error("cannot register a device interrupt with KVM: {0}")]
    Irqfd(kvm_ioctls::Error),
}

/// The legacy devices of one VM.
pub struct LegacyDevices {
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The COM1 UART (shared with the console input subscriber).
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest resets the CPU through the i8042.
    pub reset_evt: EventFd,
    /// The i8042 (for snapshots).
    pub i8042: Arc<Mutex<I8042>>,
    /// The CMOS RTC (for snapshots).
    pub rtc: Arc<Mutex<Rtc>>,
    /// The profiler device, if the VM has one (for snapshots).
    pub profiler: Option<Arc<Mutex<ProfilerDevice>>>,
    /// The copy-on-write disk, if the VM has one (for snapshots).
    pub disk: Option<Arc<Mutex<mirrorball_devices::virtio_blk::VirtioBlkDevice>>>,
    /// Watches the console output for `--snapshot-on`'s text.
    pub serial_watch: Arc<SerialWatch>,
}

impl LegacyDevices {
    /// Creates COM1 (output to `out`, interrupt on GSI 4 through an irqfd), the i8042 and the RTC, beside
    /// the MMIO devices already on `mmio`.
    pub fn new(vm: &Vm, out: SerialWriter, mmio: Bus) -> Result<Self, DeviceError> {
        let irq = EventFdTrigger::new().map_err(DeviceError::EventFd)?;
        vm.fd()
            .register_irqfd(irq.event_fd(), COM1_IRQ)
            .map_err(DeviceError::Irqfd)?;
        let serial_watch = Arc::new(SerialWatch::default());
        let out: SerialWriter = Box::new(WatchedWriter::new(out, serial_watch.clone()));
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(irq, out).map_err(DeviceError::Serial)?,
        ));
        let reset = EventFdTrigger::new().map_err(DeviceError::EventFd)?;
        let reset_evt = reset.try_clone_event_fd().map_err(DeviceError::EventFd)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(reset)));
        let rtc = Arc::new(Mutex::new(Rtc::new()));
        let mut pio = Bus::new();
        pio.insert(COM1_PORT_BASE, COM1_PORT_LEN, serial.clone())?;
        pio.insert(I8042_PORT_BASE, I8042_PORT_LEN, i8042.clone())?;
        pio.insert(RTC_PORT_BASE, RTC_PORT_LEN, rtc.clone())?;
        Ok(Self {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            reset_evt,
            i8042,
            rtc,
            profiler: None,
            disk: None,
            serial_watch,
        })
    }

    /// Every device's state, for a snapshot (the vCPUs parked, so no exit holds a device).
    pub fn state(&self) -> Result<crate::snapshot::state::DeviceStates, String> {
        Ok(crate::snapshot::state::DeviceStates {
            serial: lock(&self.serial).state(),
            i8042: lock(&self.i8042).state(),
            rtc: lock(&self.rtc).state(),
            profiler: self.profiler.as_ref().map(|p| lock(p).state()),
            blk: self.disk.as_ref().map(|d| lock(d).blk_state()),
        })
    }

    /// Loads saved device state into these (new, not yet running) devices.
    pub fn restore(&self, saved: &crate::snapshot::state::DeviceStates) -> Result<(), String> {
        lock(&self.serial)
            .restore(&saved.serial)
            .map_err(|e| e.to_string())?;
        lock(&self.i8042)
            .restore(&saved.i8042)
            .map_err(|e| e.to_string())?;
        lock(&self.rtc)
            .restore(&saved.rtc)
            .map_err(|e| e.to_string())?;
        match (&self.disk, &saved.blk) {
            (Some(device), Some(state)) => {
                lock(device).restore_blk(state).map_err(|e| e.to_string())?
            }
            (None, None) => {}
            (Some(_), None) => return Err("the snapshot's VM had no disk".into()),
            (None, Some(_)) => return Err("the snapshot's VM had a disk, this one has none".into()),
        }
        match (&self.profiler, &saved.profiler) {
            (Some(device), Some(state)) => lock(device).restore(state).map_err(|e| e.to_string()),
            (None, None) => Ok(()),
            (Some(_), None) => Err("the snapshot's VM had no profiler device".into()),
            (None, Some(_)) => {
                Err("the snapshot's VM had a profiler device, this one has none".into())
            }
        }
    }

    /// The exit handler over these devices' buses; it ends the VM on the i8042's CPU reset.
    pub fn exit_handler(&self) -> Result<Arc<BusExits>, DeviceError> {
        Ok(Arc::new(BusExits {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            reset: Some(self.reset_evt.try_clone().map_err(DeviceError::EventFd)?),
        }))
    }
}

/// A device's lock, poisoned or not (a device's state stays valid across a panic elsewhere).
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Adds the profiler device in `window` (its interrupt through an irqfd on the window's GSI) to
/// `mmio`; returns its control block and the device.
pub fn add_profiler_device(
    vm: &Vm,
    mmio: &mut Bus,
    window: MmioSlot,
    config: ProfilerDeviceConfig,
) -> Result<(Arc<ProfilerControl>, Arc<Mutex<ProfilerDevice>>), DeviceError> {
    let irq = EventFdTrigger::new().map_err(DeviceError::EventFd)?;
    vm.fd()
        .register_irqfd(irq.event_fd(), window.gsi)
        .map_err(DeviceError::Irqfd)?;
    let device = ProfilerDevice::new(config, irq);
    let control = device.control();
    let device = Arc::new(Mutex::new(device));
    mmio.insert(window.base, window.len, device.clone())?;
    Ok((control, device))
}

/// Adds a copy-on-write virtio-blk device in `window` (interrupt through an irqfd on the
/// window's GSI) over `spec`'s base with the VM's new overlay; returns its counters. With `mapped`,
/// reads of whole base pages are mapped into `mem` and recorded there (`map=on`).
pub fn add_disk_device(
    vm: &Vm,
    mmio: &mut Bus,
    window: MmioSlot,
    spec: &crate::builder::disk::DiskSpec,
    mem: &vm_memory::GuestMemoryMmap,
    vm_name: &str,
    mapped: Option<Arc<mirrorball_devices::virtio_blk::map::MappedPages>>,
) -> Result<
    (
        Arc<mirrorball_devices::virtio_blk::DiskMetrics>,
        Arc<Mutex<mirrorball_devices::virtio_blk::VirtioBlkDevice>>,
    ),
    DeviceError,
> {
    use mirrorball_devices::virtio_blk::{
        disk::CowDisk, map::BaseMapper, VirtioBlk, VirtioBlkDevice,
    };
    let irq = EventFdTrigger::new().map_err(DeviceError::EventFd)?;
    vm.fd()
        .register_irqfd(irq.event_fd(), window.gsi)
        .map_err(DeviceError::Irqfd)?;
    let overlay = spec.overlay_for(vm_name);
    let disk = match &spec.layer {
        Some(layer) => CowDisk::layered(spec.base.clone(), layer.clone(), &overlay)?,
        None => CowDisk::new(spec.base.clone(), &overlay)?,
    };
    let mut blk = VirtioBlk::new(disk, mem.clone(), &format!("mirrorball-{vm_name}"));
    if let Some(pages) = mapped {
        let mapper = BaseMapper::new(mem.clone(), spec.base.clone(), spec.map_budget(), pages);
        blk = blk.with_mapper(mapper);
    }
    let metrics = blk.metrics();
    let device = Arc::new(Mutex::new(VirtioBlkDevice::new(blk, irq)));
    mmio.insert(window.base, window.len, device.clone())?;
    Ok((metrics, device))
}

/// Routes port and MMIO exits to two buses. Unmapped accesses are counted by the buses;
/// reads of them return all ones.
#[derive(Debug)]
pub struct BusExits {
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The i8042's reset eventfd (non-blocking), if the VM has one: a port write that pulsed
    /// the reset line ends the VM right there, on the vCPU thread, before the guest runs on (a
    /// Linux guest whose reset did not take effect falls back to a triple fault).
    reset: Option<EventFd>,
}

impl BusExits {
    /// Buses with no devices: every access is counted and ignored.
    pub fn empty() -> Self {
        Self {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            reset: None,
        }
    }

    /// Accesses that reached no device: (port I/O, MMIO).
    pub fn unhandled(&self) -> (u64, u64) {
        (
            self.pio.unmapped_reads() + self.pio.unmapped_writes(),
            self.mmio.unmapped_reads() + self.mmio.unmapped_writes(),
        )
    }
}

impl ExitHandler for BusExits {
    fn io_in(&self, _: usize, port: u16, data: &mut [u8]) -> VcpuAction {
        self.pio.read(u64::from(port), data);
        VcpuAction::Continue
    }

    fn io_out(&self, _: usize, port: u16, data: &[u8]) -> VcpuAction {
        self.pio.write(u64::from(port), data);
        let i8042 = (I8042_PORT_BASE..I8042_PORT_BASE + I8042_PORT_LEN).contains(&u64::from(port));
        // A read of 0 (EAGAIN) means no reset; the event loop's watcher sees nothing either.
        if i8042 && self.reset.as_ref().is_some_and(|r| r.read().is_ok()) {
            return VcpuAction::StopVm(crate::exit::VmEnd::GuestReset);
        }
        VcpuAction::Continue
    }

    fn mmio_read(&self, _: usize, addr: u64, data: &mut [u8]) -> VcpuAction {
        self.mmio.read(addr, data);
        VcpuAction::Continue
    }

    fn mmio_write(&self, _: usize, addr: u64, data: &[u8]) -> VcpuAction {
        self.mmio.write(addr, data);
        VcpuAction::Continue
    }
}
