//! The per-VM platform allocator: memory slots, MMIO windows and interrupt lines, handed out in a
//! fixed order so that every VM built from one configuration gets the same platform (a clone's
//! kernel command line, prepared once in its template, announces devices at the addresses the
//! clone really has them). It also collects the kernel command-line entries that announce
//! virtio-mmio devices to a guest without ACPI.
use crate::arch::x86_64::layout::{MMIO_GAP_END, VIRTIO_MMIO_BASE};

/// First GSI handed to devices (0–4 are the PIT, keyboard, cascade and COM ports).
pub const FIRST_DEVICE_GSI: u32 = 5;
/// Last GSI the IOAPIC has.
pub const LAST_GSI: u32 = 23;

/// Errors allocating platform resources.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlatformError {
    /// No interrupt line is left.
    #[error("no interrupt line left for a device (GSIs {FIRST_DEVICE_GSI}..={LAST_GSI} in use)")]
    NoGsi,
    /// The MMIO window is full.
    #[error("no room left for a {0}-byte MMIO window in the device hole")]
    NoMmio(u64),
}

/// An MMIO window with its interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// GSI of its interrupt.
    pub gsi: u32,
}

/// Hands out one VM's memory slots, MMIO windows and GSIs.
#[derive(Debug)]
pub struct PlatformAllocator {
    next_slot: u32,
    next_mmio: u64,
    mmio_end: u64,
    next_gsi: u32,
    cmdline: Vec<String>,
}

impl PlatformAllocator {
    /// An allocator whose memory slots start after the `ram_slots` that hold RAM.
    pub fn new(ram_slots: u32) -> Self {
        Self {
            next_slot: ram_slots,
            next_mmio: VIRTIO_MMIO_BASE,
            // Below the IOAPIC (0xfec0_0000) and KVM's private pages.
            mmio_end: MMIO_GAP_END - (20 << 20),
            next_gsi: FIRST_DEVICE_GSI,
            cmdline: Vec::new(),
        }
    }

    /// The next free memory slot.
    pub fn memslot(&mut self) -> u32 {
        let slot = self.next_slot;
        self.next_slot += 1;
        slot
    }

    /// An MMIO window of `len` bytes (rounded up to 4 KiB) with an interrupt line.
    pub fn mmio(&mut self, len: u64) -> Result<MmioSlot, PlatformError> {
        let len = len.max(1).div_ceil(0x1000) * 0x1000;
        let end = self
            .next_mmio
            .checked_add(len)
            .filter(|&e| e <= self.mmio_end)
            .ok_or(PlatformError::NoMmio(len))?;
        if self.next_gsi > LAST_GSI {
            return Err(PlatformError::NoGsi);
        }
        let slot = MmioSlot {
            base: self.next_mmio,
            len,
            gsi: self.next_gsi,
        };
        self.next_mmio = end;
        self.next_gsi += 1;
        Ok(slot)
    }

    /// A virtio-mmio device window, announced on the kernel command line.
    pub fn virtio_mmio(&mut self, len: u64) -> Result<MmioSlot, PlatformError> {
        let slot = self.mmio(len)?;
        self.cmdline.push(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            slot.len >> 10,
            slot.base,
            slot.gsi
        ));
        Ok(slot)
    }

    /// The command-line entries that announce the devices allocated so far.
    pub fn cmdline_entries(&self) -> String {
        self.cmdline.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_resources_in_a_fixed_order() {
        let mut a = PlatformAllocator::new(1);
        assert_eq!(a.memslot(), 1);
        assert_eq!(a.memslot(), 2);
        let dev = a.virtio_mmio(0x1000).expect("window");
        assert_eq!(
            dev,
            MmioSlot {
                base: VIRTIO_MMIO_BASE,
                len: 0x1000,
                gsi: FIRST_DEVICE_GSI
            }
        );
        let next = a.mmio(10).expect("window");
        assert_eq!(next.base, VIRTIO_MMIO_BASE + 0x1000);
        assert_eq!(next.len, 0x1000);
        assert_eq!(
            a.cmdline_entries(),
            format!("virtio_mmio.device=4K@{VIRTIO_MMIO_BASE:#x}:{FIRST_DEVICE_GSI}")
        );
    }

    #[test]
    fn runs_out_cleanly() {
        let mut a = PlatformAllocator::new(0);
        for _ in FIRST_DEVICE_GSI..=LAST_GSI {
            a.mmio(0x1000).expect("window");
        }
        assert_eq!(a.mmio(0x1000), Err(PlatformError::NoGsi));
        let mut b = PlatformAllocator::new(0);
        assert!(matches!(b.mmio(1 << 40), Err(PlatformError::NoMmio(_))));
    }
}
