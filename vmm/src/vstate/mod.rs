//! KVM-facing state of one VM: guest memory, the VM file descriptor, the vCPUs.
pub mod first_slice;
pub mod halt;
pub mod memory;
pub mod vcpu;
pub mod vcpu_thread;
pub mod vm;
