//! Global descriptor table and the segment registers KVM needs to match it.
//!
//! One table serves both boot paths. Linux's 64-bit boot protocol asks for flat code at selector
//! 0x10 and flat data at 0x18; the OS-less guest also needs user-mode code and data (DPL 3) and a
//! TSS for a valid task register.
use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{GDT_ADDR, TSS_ADDR};

/// Kernel code selector (64-bit, DPL 0).
pub const KERNEL_CS: u16 = 0x10;
/// Kernel data selector (DPL 0).
pub const KERNEL_DS: u16 = 0x18;
/// User data selector with RPL 3.
pub const USER_DS: u16 = 0x20 | 3;
/// User code selector (64-bit) with RPL 3.
pub const USER_CS: u16 = 0x28 | 3;
/// Task-state segment selector (a 16-byte descriptor in long mode).
pub const TSS_SELECTOR: u16 = 0x30;
/// Bytes in a 64-bit TSS.
pub const TSS_LIMIT: u32 = 0x67;

/// Builds a legacy 8-byte descriptor from its parts.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

// Access/flag words: bits 0..7 = access byte, bits 12..15 = G, D/B, L, AVL.
const CODE64_DPL0: u16 = 0xa09b; // G, L, present, code, exec/read, accessed
const DATA_DPL0: u16 = 0xc093; // G, D/B, present, data, read/write, accessed
const DATA_DPL3: u16 = 0xc0f3;
const CODE64_DPL3: u16 = 0xa0fb;
const TSS64_BUSY: u16 = 0x008b; // present, 64-bit TSS (busy)

/// The table as it is written to guest memory.
pub fn gdt_entries() -> [u64; 8] {
    // A fixed address below 1 MiB.
    #[allow(clippy::cast_possible_truncation)]
    let tss = descriptor(TSS64_BUSY, TSS_ADDR as u32, TSS_LIMIT);
    [
        0,
        0,
        descriptor(CODE64_DPL0, 0, 0xfffff),
        descriptor(DATA_DPL0, 0, 0xfffff),
        descriptor(DATA_DPL3, 0, 0xfffff),
        descriptor(CODE64_DPL3, 0, 0xfffff),
        tss,
        TSS_ADDR >> 32, // upper half of the 16-byte TSS descriptor
    ]
}

/// Decodes a descriptor into the segment form KVM takes, for selector `selector`.
pub fn segment_from_descriptor(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) & 0xf_ffff) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The segment for a selector of [`gdt_entries`].
pub fn segment(selector: u16) -> kvm_segment {
    let entries = gdt_entries();
    let index = usize::from(selector >> 3) % entries.len();
    segment_from_descriptor(entries[index], selector)
}

/// Writes the GDT and a zeroed TSS (no I/O bitmap: its offset points past the limit).
pub fn write_gdt_and_tss(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in gdt_entries().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    let mut tss = [0u8; TSS_LIMIT as usize + 1];
    // I/O map base beyond the limit: no bitmap, so IOPL alone governs port access.
    // The TSS limit is 0x67.
    #[allow(clippy::cast_possible_truncation)]
    tss[0x66..0x68].copy_from_slice(&((TSS_LIMIT as u16) + 1).to_le_bytes());
    mem.write_slice(&tss, GuestAddress(TSS_ADDR))
}

/// Limit of the GDT (bytes - 1) for `GDTR`.
pub fn gdt_limit() -> u16 {
    u16::try_from(gdt_entries().len() * 8 - 1).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_kernel_code_decodes_as_long_mode_ring0() {
        let cs = segment(KERNEL_CS);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.dpl, cs.g),
            (0, 0xffff_ffff, 1, 0, 0, 1)
        );
        assert_eq!((cs.type_, cs.s, cs.present), (0xb, 1, 1));
        let ds = segment(KERNEL_DS);
        assert_eq!((ds.type_, ds.db, ds.l, ds.dpl), (0x3, 1, 0, 0));
    }

    #[test]
    fn user_segments_have_dpl3() {
        assert_eq!(segment(USER_CS).dpl, 3);
        assert_eq!(segment(USER_CS).l, 1);
        assert_eq!(segment(USER_DS).dpl, 3);
        assert_eq!(segment(USER_CS).selector & 3, 3);
    }

    #[test]
    fn tss_descriptor_points_at_tss() {
        let tr = segment(TSS_SELECTOR);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s),
            (TSS_ADDR, TSS_LIMIT, 0xb, 0)
        );
    }

    #[test]
    fn descriptor_round_trips_base_and_limit() {
        let seg = segment_from_descriptor(descriptor(0x0093, 0x1234_5678, 0xabcde), 8);
        assert_eq!((seg.base, seg.limit, seg.g), (0x1234_5678, 0xabcde, 0));
    }
}
