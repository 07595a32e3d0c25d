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
//! * [`i8042`]: the keyboard controller, only for its CPU-reset command.
//! * [`terminal`]: the raw-mode guard for the host terminal.
//! * [`legacy`]: which legacy ports Linux probes and why we leave them unmapped.
//!
//! Every device treats guest accesses as hostile: any offset, any size, any
//! value must be handled without panicking.

pub mod bus;
pub mod i8042;
pub mod legacy;
pub mod serial;
pub mod terminal;
pub mod trigger;

pub use bus::{Bus, BusDevice, BusError};
pub use i8042::I8042;
pub use serial::{SerialDevice, SerialInput, SharedBuffer};
pub use terminal::RawTerminal;
pub use trigger::EventFdTrigger;
