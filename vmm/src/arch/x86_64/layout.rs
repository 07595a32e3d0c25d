//! Guest-physical memory layout shared by the Linux and the OS-less boot paths.
//!
//! Low memory follows the PC conventions Linux expects: real-mode area and boot structures below
//! 640 KiB, the EBDA and BIOS area reserved up to 1 MiB, RAM from 1 MiB, and a hole below 4 GiB
//! for the IOAPIC, local APIC and virtio-mmio devices.

/// Global descriptor table (see `gdt`).
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty: any exception before the guest loads its own is fatal).
pub const IDT_ADDR: u64 = 0x580;
/// 64-bit task-state segment, needed for a valid TR (and for CPL3 → CPL0 transitions).
pub const TSS_ADDR: u64 = 0x600;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU for Linux (grows down, below the page tables).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Boot page tables for Linux (PML4, PDPT, four page directories: the first 4 GiB). They sit in
/// the e820-reserved area above the EBDA, so the kernel never reuses their pages: on a
/// shadow-paging host every write to a page KVM still shadows as a page table is emulated.
pub const LINUX_PAGE_TABLES: u64 = 0xa0000;
/// Page tables of the OS-less guest (PML4, PDPT, then up to [`WORKLOAD_MAX_PDS`] page
/// directories), user-accessible.
pub const WORKLOAD_PAGE_TABLES: u64 = 0x40000;
/// Most page directories (GiB of identity map) the OS-less guest gets.
pub const WORKLOAD_MAX_PDS: u64 = 64;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Most bytes of command line, including the terminating NUL (boot protocol 2.06+ limit we use).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; from here to 1 MiB is reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy area: where "high" RAM begins.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit device hole (IOAPIC, LAPIC, virtio-mmio); RAM resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit device hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First guest-physical address of the virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Address KVM needs for its real-mode TSS (three pages) on Intel hosts.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Address KVM needs for its identity-map page on Intel hosts (one page, below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Page size.
pub const PAGE_SIZE: u64 = 0x1000;
