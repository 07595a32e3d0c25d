//! Identity-mapped page tables built by the VMM before the first instruction.
//!
//! 2 MiB pages: one PML4 entry, one PDPT with an entry per GiB, and a page directory per GiB.
//! Linux gets the first 4 GiB (the boot protocol only needs the kernel, zero page and command
//! line mapped; the kernel builds its own tables at once). The OS-less guest gets all of its RAM,
//! user-accessible, because it runs in ring 3 and never changes them.
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 1 << 21;

/// Errors building page tables.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The identity map would need more page directories than the caller reserved.
    #[error("identity map of {gib} GiB exceeds the {max} GiB reserved for page directories")]
    TooLarge {
        /// GiB requested.
        gib: u64,
        /// GiB that fit.
        max: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("cannot write page tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Writes an identity map of `[0, gib GiB)`: the PML4 at `root`, the PDPT in the next page, then
/// one page directory per GiB (at most `max_pds`). Returns the value for CR3 (`root`).
pub fn write_identity_map(
    mem: &GuestMemoryMmap,
    root: u64,
    gib: u64,
    max_pds: u64,
    user: bool,
) -> Result<u64, PagingError> {
    let gib = gib.max(1);
    if gib > max_pds || gib > 512 {
        return Err(PagingError::TooLarge {
            gib,
            max: max_pds.min(512),
        });
    }
    let (pml4, pdpt, pds) = (root, root + 0x1000, root + 0x2000);
    let flags = PRESENT | WRITABLE | if user { USER } else { 0 };
    mem.write_obj(pdpt | flags, GuestAddress(pml4))?;
    for g in 0..gib {
        let pd = pds + g * 0x1000;
        mem.write_obj(pd | flags, GuestAddress(pdpt + g * 8))?;
        let mut table = [0u64; 512];
        for (i, entry) in table.iter_mut().enumerate() {
            *entry = (g * GIB + i as u64 * TWO_MIB) | flags | HUGE;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(pd))?;
    }
    Ok(pml4)
}

/// Translates a guest-virtual address through 4-level page tables rooted at `cr3`, reading them
/// from guest memory. `None` when an entry is absent or unreadable. Used to show the guest code
/// at a failing instruction pointer; it trusts nothing in the tables.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, gva: u64) -> Option<u64> {
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (gva >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let page_mask = (1u64 << shift) - 1;
        if level == 0 || (level < 3 && entry & HUGE != 0) {
            return Some((entry & ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory")
    }

    #[test]
    fn maps_each_2mib_page_to_itself() {
        let m = mem();
        let cr3 = write_identity_map(&m, 0x9000, 2, 4, false).expect("map");
        assert_eq!(cr3, 0x9000);
        let pml4: u64 = m.read_obj(GuestAddress(0x9000)).expect("read");
        assert_eq!(pml4 & !0xfff, 0xa000);
        let pdpt1: u64 = m.read_obj(GuestAddress(0xa000 + 8)).expect("read");
        assert_eq!(pdpt1 & !0xfff, 0xc000);
        // Second GiB, entry 3 → 1 GiB + 6 MiB.
        let pde: u64 = m.read_obj(GuestAddress(0xc000 + 3 * 8)).expect("read");
        assert_eq!(pde & !0xfff, GIB + 3 * TWO_MIB);
        assert_eq!(
            pde & (HUGE | PRESENT | WRITABLE | USER),
            HUGE | PRESENT | WRITABLE
        );
    }

    #[test]
    fn user_flag_on_every_level() {
        let m = mem();
        write_identity_map(&m, 0x9000, 1, 1, true).expect("map");
        for addr in [0x9000, 0xa000, 0xb000, 0xb000 + 511 * 8] {
            let e: u64 = m.read_obj(GuestAddress(addr)).expect("read");
            assert_ne!(e & USER, 0, "entry at {addr:#x}");
        }
    }

    #[test]
    fn translate_walks_the_identity_map() {
        let m = mem();
        let cr3 = write_identity_map(&m, 0x9000, 2, 4, false).expect("map");
        assert_eq!(translate(&m, cr3, 0x1234_5678), Some(0x1234_5678));
        assert_eq!(translate(&m, cr3, 3 << 30), None, "beyond the map");
        assert_eq!(
            translate(&m, 0x7_0000_0000, 0x1000),
            None,
            "cr3 outside memory"
        );
    }

    #[test]
    fn refuses_more_than_reserved() {
        assert!(matches!(
            write_identity_map(&mem(), 0x9000, 5, 4, false),
            Err(PagingError::TooLarge { gib: 5, max: 4 })
        ));
    }
}
