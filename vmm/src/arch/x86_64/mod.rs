//! x86_64 boot state: CPUID, MSRs, MP table, local APIC.
pub mod cpuid;
pub mod lapic;
pub mod mptable;
pub mod msr;
