//! The i8042 keyboard controller, emulated only for its CPU-reset command.
//!
//! This module owns [`I8042`]: `vm_superio::I8042Device` behind the
//! [`BusDevice`] interface. Writing `0xFE` to the command port (0x64) is how
//! Linux resets the machine with `reboot=k`; the device then signals its reset
//! [`EventFdTrigger`], which the VMM watches to end the VM.
//!
//! # Port window
//!
//! The device is inserted as one range of [`I8042_PORT_LEN`] ports starting at
//! [`I8042_PORT_BASE`] (0x60..=0x64). Only two offsets are meaningful, and
//! only for single-byte accesses:
//!
//! | offset | port | read                    | write                      |
//! |--------|------|-------------------------|----------------------------|
//! | 0      | 0x60 | data: always 0          | ignored                    |
//! | 4      | 0x64 | status: always 0        | command: `0xFE` resets     |
//!
//! A status of 0 means "input buffer empty" (so Linux's reset path never waits)
//! and "no output data" (so Linux's i8042 driver finds no working controller).
//! Every other access (offsets 1..=3, which on a PC belong to other chips such
//! as port B at 0x61, or a wider access) reads as all ones like an unmapped
//! port and has no effect.

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// First I/O port of the window the i8042 is inserted at.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Number of I/O ports in the window (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the data port (0x60) in the window.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64) in the window.
pub const COMMAND_OFFSET: u64 = 4;
/// The command that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller as a bus device; see the module docs for its ports.
#[derive(Debug)]
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
    reset_errors: u64,
}

impl I8042 {
    /// Creates the controller; `reset_evt` is signalled on a CPU reset
    /// command. Keep a clone of it (or use [`Self::reset_evt`]) to watch.
    pub fn new(reset_evt: EventFdTrigger) -> Self {
        Self {
            device: I8042Device::new(reset_evt),
            reset_errors: 0,
        }
    }

    /// The trigger signalled when the guest requests a CPU reset.
    pub fn reset_evt(&self) -> &EventFdTrigger {
        self.device.reset_evt()
    }

    /// Reset requests whose eventfd could not be signalled.
    pub fn reset_errors(&self) -> u64 {
        self.reset_errors
    }

    /// The vm-superio register offset of a meaningful access.
    fn register(offset: u64, len: usize) -> Option<u8> {
        match offset {
            DATA_OFFSET | COMMAND_OFFSET if len == 1 => u8::try_from(offset).ok(),
            _ => None,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::register(offset, data.len()) {
            Some(reg) => data[0] = self.device.read(reg),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(reg) = Self::register(offset, data.len()) {
            if self.device.write(reg, data[0]).is_err() {
                self.reset_errors = self.reset_errors.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use std::io;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    fn setup() -> (Bus, EventFd) {
        let trigger = EventFdTrigger::new().unwrap();
        let watcher = trigger.try_clone_event_fd().unwrap();
        let mut bus = Bus::new();
        bus.insert(
            I8042_PORT_BASE,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(trigger))),
        )
        .unwrap();
        (bus, watcher)
    }

    fn fired(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(n) => n > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("reset eventfd read: {e}"),
        }
    }

    #[test]
    fn reset_command_fires_the_reset_event() {
        let (bus, reset) = setup();
        assert!(!fired(&reset));
        assert!(bus.write(0x64, &[CMD_RESET_CPU]));
        assert!(fired(&reset));
        // Consumed: no second report without a second command.
        assert!(!fired(&reset));
    }

    #[test]
    fn other_writes_do_not_reset() {
        let (bus, reset) = setup();
        // Other commands, the reset value on the wrong ports or with the
        // wrong size.
        for value in [0x00, 0x20, 0x60, 0xaa, 0xad, 0xd1, 0xff] {
            bus.write(0x64, &[value]);
        }
        for port in 0x60..=0x63 {
            bus.write(port, &[CMD_RESET_CPU]);
        }
        bus.write(0x64, &[]);
        assert!(!fired(&reset));
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(I8042::new(EventFdTrigger::new().unwrap())));
        bus.insert(I8042_PORT_BASE, I8042_PORT_LEN, dev.clone())
            .unwrap();
        let wide = dev
            .lock()
            .unwrap()
            .reset_evt()
            .try_clone_event_fd()
            .unwrap();
        dev.lock()
            .unwrap()
            .write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        assert!(!fired(&wide));
    }

    #[test]
    fn reads_give_idle_status_and_all_ones_elsewhere() {
        let (bus, _reset) = setup();
        let mut data = [0xaa];
        assert!(bus.read(0x64, &mut data));
        assert_eq!(data, [0]);
        assert!(bus.read(0x60, &mut data));
        assert_eq!(data, [0]);
        assert!(bus.read(0x61, &mut data));
        assert_eq!(data, [0xff]);
        let mut wide = [0u8; 2];
        assert!(bus.read(0x60, &mut wide));
        assert_eq!(wide, [0xff; 2]);
    }
}
