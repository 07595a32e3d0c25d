//! x86_64 boot state: CPUID, MSRs, MP table.
pub mod cpuid;
pub mod mptable;
pub mod msr;
