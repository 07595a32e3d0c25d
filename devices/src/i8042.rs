//! The i8042 keyboard controller: a controller with no keyboard or mouse attached that answers
//! its own commands like real hardware, and resets the CPU on command `0xFE`.
//!
//! This module owns [`I8042`]. Linux's i8042 driver talks to the controller before it looks for
//! devices: it reads and writes the command byte (CTR), runs the AUX loopback and the
//! bit-assignment test, and enables the ports. A controller that never answers makes each of
//! those commands wait for its timeout (about 0.5 s each, made of thousands of status reads,
//! each a VM exit), so this one answers at once. It reports no AUX (mouse) port: enabling AUX
//! leaves the command byte's "AUX disabled" bit set, which Linux reads as "no AUX port". Bytes
//! for the keyboard (data port writes outside a controller command) are dropped, as a controller
//! with nothing plugged in would send them nowhere; the keyboard driver's own probe times out
//! asynchronously without holding up the boot. There are no interrupts: every answer is polled
//! (status bit 0).
//!
//! Writing `0xFE` to the command port is how Linux resets the machine with `reboot=k`; the
//! device then signals its reset [`EventFdTrigger`], which the VMM watches to end the VM.
//!
//! # Port window
//!
//! One range of [`I8042_PORT_LEN`] ports starting at [`I8042_PORT_BASE`] (0x60..=0x64). Only
//! single-byte accesses to offsets 0 (data, 0x60) and 4 (status/command, 0x64) mean anything;
//! every other access (offsets 1..=3 belong to other chips on a PC, such as port B at 0x61, and
//! wider accesses) reads as all ones and has no effect. The input buffer is never full (status
//! bit 1 is always clear), so Linux's reset path never waits.
use std::collections::VecDeque;

use vm_superio::Trigger;

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

/// Controller commands (port 0x64) this model answers.
pub mod cmd {
    /// Read the command byte.
    pub const READ_CTR: u8 = 0x20;
    /// Write the command byte (next data byte).
    pub const WRITE_CTR: u8 = 0x60;
    /// Disable the AUX port.
    pub const AUX_DISABLE: u8 = 0xa7;
    /// Enable the AUX port (there is none: no effect).
    pub const AUX_ENABLE: u8 = 0xa8;
    /// Test the AUX port lines.
    pub const AUX_TEST: u8 = 0xa9;
    /// Controller self-test.
    pub const SELF_TEST: u8 = 0xaa;
    /// Test the keyboard port lines.
    pub const KBD_TEST: u8 = 0xab;
    /// Disable the keyboard port.
    pub const KBD_DISABLE: u8 = 0xad;
    /// Enable the keyboard port.
    pub const KBD_ENABLE: u8 = 0xae;
    /// Read the output port.
    pub const READ_OUTPUT: u8 = 0xd0;
    /// Write the output port (next data byte).
    pub const WRITE_OUTPUT: u8 = 0xd1;
    /// Put the next data byte in the output buffer as if the keyboard sent it.
    pub const KBD_LOOP: u8 = 0xd2;
    /// Put the next data byte in the output buffer as if the AUX device sent it.
    pub const AUX_LOOP: u8 = 0xd3;
    /// Send the next data byte to the AUX device (there is none: dropped).
    pub const AUX_SEND: u8 = 0xd4;
}

/// Status register bits.
pub mod status {
    /// Output buffer full: a byte waits at the data port.
    pub const OBF: u8 = 0x01;
    /// System flag: the self-test passed.
    pub const SYSTEM: u8 = 0x04;
    /// The last write was a command (port 0x64), not data.
    pub const CMD: u8 = 0x08;
    /// Keyboard not inhibited.
    pub const UNLOCKED: u8 = 0x10;
    /// The waiting byte comes from the AUX port.
    pub const AUX_DATA: u8 = 0x20;
}

/// Command byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// Command byte after reset: keyboard interrupt on, system flag, translation; AUX disabled.
const CTR_RESET: u8 = CTR_KBD_INT | CTR_SYSTEM | CTR_AUX_DISABLED | CTR_TRANSLATE;
/// Self-test and port-test results.
const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// Output port after reset: A20 on, CPU not in reset.
const OUTPUT_PORT_RESET: u8 = 0x03;
/// Most bytes the output buffer holds; more answers than that without a read are dropped.
const OUT_CAPACITY: usize = 16;

/// The data byte a pending command waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    Ctr,
    OutputPort,
    KbdLoop,
    AuxLoop,
    AuxSend,
}

/// The i8042 controller as a bus device; see the module docs for what it answers.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFdTrigger,
    reset_errors: u64,
    ctr: u8,
    output_port: u8,
    last_was_command: bool,
    pending: Pending,
    /// (byte, from the AUX port).
    out: VecDeque<(u8, bool)>,
    last_read: u8,
}

impl I8042 {
    /// Creates the controller; `reset_evt` is signalled on a CPU reset
    /// command. Keep a clone of it (or use [`Self::reset_evt`]) to watch.
    pub fn new(reset_evt: EventFdTrigger) -> Self {
        Self {
            reset_evt,
            reset_errors: 0,
            ctr: CTR_RESET,
            output_port: OUTPUT_PORT_RESET,
            last_was_command: false,
            pending: Pending::None,
            out: VecDeque::with_capacity(OUT_CAPACITY),
            last_read: 0,
        }
    }

    /// The trigger signalled when the guest requests a CPU reset.
    pub fn reset_evt(&self) -> &EventFdTrigger {
        &self.reset_evt
    }

    /// Reset requests whose eventfd could not be signalled.
    pub fn reset_errors(&self) -> u64 {
        self.reset_errors
    }

    /// The controller's state for a snapshot.
    pub fn state(&self) -> crate::state::I8042State {
        crate::state::I8042State {
            ctr: self.ctr,
            output_port: self.output_port,
            last_was_command: self.last_was_command,
            pending: match self.pending {
                Pending::None => 0,
                Pending::Ctr => 1,
                Pending::OutputPort => 2,
                Pending::KbdLoop => 3,
                Pending::AuxLoop => 4,
                Pending::AuxSend => 5,
            },
            out: self.out.iter().copied().collect(),
            last_read: self.last_read,
        }
    }

    /// Loads a saved state (the reset eventfd stays this controller's own).
    pub fn restore(
        &mut self,
        state: &crate::state::I8042State,
    ) -> Result<(), crate::state::StateError> {
        let err = |why: &str| crate::state::StateError::new("i8042", why);
        let pending = match state.pending {
            0 => Pending::None,
            1 => Pending::Ctr,
            2 => Pending::OutputPort,
            3 => Pending::KbdLoop,
            4 => Pending::AuxLoop,
            5 => Pending::AuxSend,
            _ => return Err(err("unknown pending command")),
        };
        if state.out.len() > OUT_CAPACITY {
            return Err(err("output buffer too long"));
        }
        self.ctr = state.ctr;
        self.output_port = state.output_port;
        self.last_was_command = state.last_was_command;
        self.pending = pending;
        self.out = state.out.iter().copied().collect();
        self.last_read = state.last_read;
        Ok(())
    }

    fn answer(&mut self, byte: u8, aux: bool) {
        if self.out.len() < OUT_CAPACITY {
            self.out.push_back((byte, aux));
        }
    }

    fn status(&self) -> u8 {
        let mut s = status::UNLOCKED;
        if self.ctr & CTR_SYSTEM != 0 {
            s |= status::SYSTEM;
        }
        if self.last_was_command {
            s |= status::CMD;
        }
        if let Some(&(_, aux)) = self.out.front() {
            s |= status::OBF;
            if aux {
                s |= status::AUX_DATA;
            }
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.out.pop_front() {
            self.last_read = byte;
        }
        // An empty buffer repeats the last byte, like the hardware latch.
        self.last_read
    }

    fn command(&mut self, c: u8) {
        self.last_was_command = true;
        self.pending = Pending::None;
        match c {
            cmd::READ_CTR => self.answer(self.ctr, false),
            cmd::WRITE_CTR => self.pending = Pending::Ctr,
            cmd::AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            // No AUX port: it stays disabled.
            cmd::AUX_ENABLE => {}
            // "Clock line stuck low": no AUX device.
            cmd::AUX_TEST => self.answer(0x01, false),
            cmd::SELF_TEST => {
                self.ctr |= CTR_SYSTEM;
                self.answer(SELF_TEST_OK, false);
            }
            cmd::KBD_TEST => self.answer(PORT_TEST_OK, false),
            cmd::KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            cmd::KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            cmd::READ_OUTPUT => self.answer(self.output_port, false),
            cmd::WRITE_OUTPUT => self.pending = Pending::OutputPort,
            cmd::KBD_LOOP => self.pending = Pending::KbdLoop,
            cmd::AUX_LOOP => self.pending = Pending::AuxLoop,
            cmd::AUX_SEND => self.pending = Pending::AuxSend,
            CMD_RESET_CPU => self.reset(),
            // Pulse-output-line commands other than the reset, and unknown ones: no effect.
            _ => {}
        }
    }

    fn reset(&mut self) {
        if self.reset_evt.trigger().is_err() {
            self.reset_errors = self.reset_errors.saturating_add(1);
        }
    }

    fn data(&mut self, byte: u8) {
        self.last_was_command = false;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Ctr => self.ctr = byte,
            Pending::OutputPort => {
                self.output_port = byte;
                // Bit 0 low holds the CPU in reset.
                if byte & 0x01 == 0 {
                    self.reset();
                }
            }
            Pending::KbdLoop => self.answer(byte, false),
            Pending::AuxLoop => self.answer(byte, true),
            // Nothing is attached to either port.
            Pending::AuxSend | Pending::None => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (DATA_OFFSET, 1) => data[0] = self.read_data(),
            (COMMAND_OFFSET, 1) => data[0] = self.status(),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, [b]) => self.data(*b),
            (COMMAND_OFFSET, [c]) => self.command(*c),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
