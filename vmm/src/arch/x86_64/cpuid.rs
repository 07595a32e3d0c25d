//! CPUID filtering for the guest.
