//! x86_64 boot state: memory layout, GDT, page tables, registers, zero page, CPUID, MSRs, MP
//! table, local APIC.
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
