//! Mirrorball VMM library: builds and runs virtual machines on KVM.
//!
//! Layout follows the data flow of a VM's life: `host` (what all VMs of a process share),
//! `arch` (x86_64 boot state), `vstate` (KVM VM, vCPUs and guest memory: fresh or cloned from a
//! template), `workload` (the embedded OS-less guest), `builder` (from a configuration and its
//! resources to a VM ready to run), `fleet` (many VMs from one command or file), `session` (VMs
//! running under one event loop), `exit` (why a VM ended).
pub mod arch;
pub mod budget;
pub mod builder;
pub mod cli;
pub mod control;
pub mod devices;
pub mod exit;
pub mod fleet;
pub mod gates;
pub mod host;
pub mod ksm;
pub mod loader;
pub mod placement;
pub mod profiling;
pub mod report;
pub mod runner;
pub mod session;
pub mod snapshot;
pub mod study;
pub mod vstate;
pub mod workload;
