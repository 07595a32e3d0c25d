//! Legacy PC ports Linux touches at boot that Mirrorball deliberately leaves
//! unmapped, and why.
//!
//! This module owns that decision and [`describe_port`], which names legacy
//! ports so the VMM can explain the unmapped accesses it sees. It registers
//! no device: every port below behaves like an empty slot on the bus (reads
//! return all ones, writes are dropped, [`crate::bus::Bus`] counts both), and
//! that is what Linux handles best.
//!
//! * **0x80 (POST code / I/O delay)**: only written, by `outb_p` delays. A
//!   dropped write is exactly what a sink would do, so no sink is needed.
//! * **0x70-0x71 (CMOS/RTC)**: no longer left unmapped: all ones there means
//!   "update in progress" forever, and a stock kernel's RTC reads waited for
//!   their timeouts at boot. [`crate::rtc::Rtc`] answers with the host's time.
//! * **0xcf8-0xcff (PCI configuration mechanism #1)**: reading back all ones
//!   after writing the address register fails Linux's type-1 probe, so it
//!   concludes there is no PCI bus, which is true here (or boot with `pci=off`
//!   to skip the probe).
//! * **0x92 (fast A20 gate)**: a 64-bit boot protocol entry never toggles A20.
//! * **0x61 (system control port B)**: claimed by KVM's in-kernel PIT (speaker
//!   gate) when the VMM creates one, so it never reaches this bus.
//! * **0x20-0x21, 0xa0-0xa1 (PIC), 0x40-0x43 (PIT)**: handled in the kernel by
//!   KVM's irqchip and PIT, never reach this bus.

/// A short name for a well-known legacy PC port (emulated here or not), or
/// `None`; for labelling unmapped accesses in diagnostics.
pub fn describe_port(port: u16) -> Option<&'static str> {
    Some(match port {
        0x80 => "POST code / I/O delay",
        0x70..=0x71 => "CMOS/RTC",
        0x92 => "fast A20 gate",
        0x61 => "system control port B",
        0xcf8..=0xcff => "PCI configuration mechanism #1",
        0x20..=0x21 | 0xa0..=0xa1 => "8259 PIC",
        0x40..=0x43 => "8254 PIT",
        0x3f8..=0x3ff => "COM1",
        0x2f8..=0x2ff => "COM2",
        0x3e8..=0x3ef => "COM3",
        0x2e8..=0x2ef => "COM4",
        0x60 | 0x64 => "i8042",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_known_ports_only() {
        assert_eq!(describe_port(0x80), Some("POST code / I/O delay"));
        assert_eq!(describe_port(0x71), Some("CMOS/RTC"));
        assert_eq!(describe_port(0xcfc), Some("PCI configuration mechanism #1"));
        assert_eq!(describe_port(0x2f9), Some("COM2"));
        assert_eq!(describe_port(0x1234), None);
        assert_eq!(describe_port(0xffff), None);
    }
}
