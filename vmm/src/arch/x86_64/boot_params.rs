//! The Linux zero page (`struct boot_params`): e820 map, command line, initramfs, setup header.
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{CMDLINE_ADDR, EBDA_START, HIGH_RAM_START, MMIO_GAP_END, ZERO_PAGE_ADDR};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// Loader type "undefined" (0xff): we are not one of the registered boot loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment a relocatable kernel asks for when the image gives none (ELF vmlinux).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// What goes into the zero page besides the memory map.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// The bzImage's setup header, or `None` for an ELF kernel.
    pub setup_header: Option<setup_header>,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// Initramfs (guest address, size).
    pub initrd: Option<(u64, u64)>,
}

/// The e820 map for guest RAM given as (start, length) ranges, sorted: low RAM below the EBDA,
/// the EBDA/BIOS area reserved, RAM from 1 MiB, and RAM above 4 GiB if any.
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<boot_e820_entry> {
    let mut map = Vec::new();
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    for &(start, len) in ram {
        let end = start.saturating_add(len);
        if start < HIGH_RAM_START {
            map.push(entry(start, EBDA_START.min(end) - start, E820_RAM));
            map.push(entry(
                EBDA_START,
                HIGH_RAM_START - EBDA_START,
                E820_RESERVED,
            ));
            if end > HIGH_RAM_START {
                map.push(entry(HIGH_RAM_START, end - HIGH_RAM_START, E820_RAM));
            }
        } else {
            map.push(entry(start, len, E820_RAM));
        }
    }
    map
}

/// Builds the zero page.
pub fn build_zero_page(info: &BootInfo, ram: &[(u64, u64)]) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = info.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(u32::MAX);
    params.hdr.cmdline_size = u32::try_from(info.cmdline_len).unwrap_or(u32::MAX);
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = (addr & 0xffff_ffff) as u32;
        params.hdr.ramdisk_size = (size & 0xffff_ffff) as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820_map(ram);
    let n = map.len().min(params.e820_table.len());
    params.e820_table[..n].copy_from_slice(&map[..n]);
    params.e820_entries = u8::try_from(n).unwrap_or(u8::MAX);
    params
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    params: &boot_params,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_ADDR))
}

/// The highest address below 4 GiB that usable RAM reaches (for placing the initramfs).
pub fn low_ram_end(ram: &[(u64, u64)]) -> u64 {
    ram.iter()
        .filter(|(start, _)| *start < MMIO_GAP_END)
        .map(|(start, len)| (start + len).min(MMIO_GAP_END))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_reserves_legacy_area_and_keeps_high_ram() {
        let map = e820_map(&[(0, 0x4000_0000), (0x1_0000_0000, 0x1000_0000)]);
        let v: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            v,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
                (HIGH_RAM_START, 0x4000_0000 - HIGH_RAM_START, E820_RAM),
                (0x1_0000_0000, 0x1000_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_magic() {
        let info = BootInfo {
            setup_header: None,
            cmdline_len: 42,
            initrd: Some((0x3f00_0000, 0x10_0000)),
        };
        let p = build_zero_page(&info, &[(0, 0x4000_0000)]);
        let (ptr, size, img, rd) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
        );
        assert_eq!(
            (ptr, size, img, rd),
            (
                u32::try_from(CMDLINE_ADDR).expect("fits"),
                42,
                0x3f00_0000,
                0x10_0000
            )
        );
        let (flag, magic, loader, entries) = (
            p.hdr.boot_flag,
            p.hdr.header,
            p.hdr.type_of_loader,
            p.e820_entries,
        );
        assert_eq!(
            (flag, magic, loader, entries),
            (0xaa55, 0x5372_6448, 0xff, 3)
        );
    }

    #[test]
    fn low_ram_end_stops_at_4gib() {
        assert_eq!(
            low_ram_end(&[(0, 0xc000_0000), (1 << 32, 1 << 30)]),
            0xc000_0000
        );
        assert_eq!(low_ram_end(&[(0, 64 << 20)]), 64 << 20);
    }
}
