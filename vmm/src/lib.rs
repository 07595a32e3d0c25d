//! Mirrorball VMM library: builds and runs virtual machines on KVM.
//!
//! Layout follows the data flow of a VM's life: `arch` (x86_64 boot state), `vstate` (KVM VM,
//! vCPUs and guest memory), `workload` (the embedded OS-less guest), `builder` (from a
//! configuration to a running VM), `exit` (why a VM ended).
pub mod arch;
pub mod builder;
pub mod cli;
pub mod devices;
pub mod exit;
pub mod gates;
pub mod loader;
pub mod profiling;
pub mod report;
pub mod runner;
pub mod session;
pub mod vstate;
pub mod workload;
