//! Mirrorball VMM library: builds and runs virtual machines on KVM.
//!
//! Layout follows the data flow of a VM's life: `arch` (x86_64 boot state), `vstate` (KVM VM,
//! vCPUs and guest memory), `builder` (from a configuration to a running VM).
pub mod arch;
