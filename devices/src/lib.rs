//! Emulated devices of the Mirrorball VMM.
//!
//! This crate owns everything a guest reaches through port I/O or MMIO exits
//! that the VMM handles in user space:
//!
//! * [`bus`]: the address-range dispatch ([`bus::Bus`]) that vCPU threads call
//!   on every PIO/MMIO exit, and the [`bus::BusDevice`] trait devices implement.
//! * [`trigger`]: [`trigger::EventFdTrigger`], the `vm_superio::Trigger` that
//!   signals an `EventFd` (an irqfd for interrupts, or a VMM-watched event).
//! * [`serial`]: the COM1 16550 UART, its output writers and the
//!   `event_manager` subscriber that feeds host input into it.
//! * [`i8042`]: the keyboard controller (no keyboard or mouse attached), answering
//!   its own commands at once, and the CPU reset.
//! * [`rtc`]: the CMOS real-time clock (MC146818) with the host's time.
//! * [`terminal`]: the raw-mode guard for the host terminal.
//! * [`legacy`]: which legacy ports Linux probes and why we leave them unmapped.
//! * [`virtio_mmio`]: the virtio-mmio (version 2) transport: registers,
//!   device status, feature negotiation, shared memory regions, virtqueues.
//! * [`virtio_blk`]: the copy-on-write virtio-blk device on that transport
//!   (a read-only base image shared by VMs, a private overlay per VM).
//! * [`profiler_device`]: the profiler device on that transport: the guest
//!   finds the profiler's shared region through it and requests a sampling
//!   period in its configuration space.
//!
//! Every device treats guest accesses as hostile: any offset, any size, any
//! value must be handled without panicking.
//!
//! # Wiring (what the VMM does)
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use mirrorball_devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
//! use mirrorball_devices::serial::{COM1_PORT_BASE, COM1_PORT_LEN};
//! use mirrorball_devices::{Bus, EventFdTrigger, SerialDevice, SerialInput, SharedBuffer};
//!
//! // Interrupt: register `irq` with KVM as the irqfd of GSI 4.
//! let serial_irq = EventFdTrigger::new()?;
//! let _irq = serial_irq.try_clone_event_fd()?;
//! let out = SharedBuffer::new(); // the VMM passes Box::new(std::io::stdout())
//! let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, Box::new(out.clone()))?));
//! // Reset: the VMM watches `reset` and ends the VM when it fires.
//! let reset_evt = EventFdTrigger::new()?;
//! let reset = reset_evt.try_clone_event_fd()?;
//!
//! let mut pio = Bus::new();
//! pio.insert(COM1_PORT_BASE, COM1_PORT_LEN, serial.clone())?;
//! pio.insert(I8042_PORT_BASE, I8042_PORT_LEN, Arc::new(Mutex::new(I8042::new(reset_evt))))?;
//! let pio = Arc::new(pio); // shared, read-only, by every vCPU thread
//!
//! // Host input: the VMM uses SerialInput::stdin(serial.clone()).
//! let (reader, _writer) = std::io::pipe()?;
//! let input = SerialInput::new(serial.clone(), Box::new(reader))?;
//! let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
//! manager.add_subscriber(Arc::new(Mutex::new(input)));
//!
//! // A vCPU exit: `outb('A', 0x3f8)`, then `outb(0xfe, 0x64)`.
//! assert!(pio.write(0x3f8, b"A"));
//! assert!(pio.write(0x64, &[0xfe]));
//! assert_eq!(out.contents(), b"A");
//! assert_eq!(reset.read()?, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bus;
pub mod i8042;
pub mod legacy;
pub mod profiler_device;
pub mod rtc;
pub mod serial;
pub mod state;
pub mod terminal;
pub mod trigger;
pub mod virtio_blk;
pub mod virtio_mmio;

pub use bus::{Bus, BusDevice, BusError};
pub use i8042::I8042;
pub use profiler_device::{ProfilerControl, ProfilerDevice, ProfilerDeviceConfig, TaskSwitchSink};
pub use rtc::Rtc;
pub use serial::{SerialDevice, SerialInput, SharedBuffer};
pub use terminal::RawTerminal;
pub use trigger::EventFdTrigger;

#[cfg(test)]
mod tests {
    /// What the VMM relies on to share these across vCPU and event-loop threads.
    #[test]
    fn shared_types_are_thread_safe() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<super::Bus>();
        send::<super::SerialDevice>();
        send::<super::SerialInput>();
        send::<super::I8042>();
        send::<super::Rtc>();
        send_sync::<super::SharedBuffer>();
        send_sync::<super::serial::SerialMetrics>();
        send::<super::ProfilerDevice>();
        send_sync::<super::ProfilerControl>();
        send_sync::<super::virtio_mmio::VirtioMmioMetrics>();
    }
}
