//! One KVM virtual machine: its file descriptor, memory slots and in-kernel interrupt chips.
//!
//! Holds no process-global state, so one process can host several VMs.
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::sync::Arc;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestRam;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Errors setting up a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Host memory mapped into a guest beside its RAM (e.g. a profiler region), owned by the VM
/// for as long as KVM may access it.
pub trait HostMapping: Send + Sync {
    /// Start of the mapping in the VMM.
    fn host_addr(&self) -> *mut u8;
    /// Its length in bytes.
    fn byte_len(&self) -> usize;
}

/// A VM with its guest RAM registered.
pub struct Vm {
    // Declared before `ram` and `mappings` so the VM (and its memory slots) goes away before the
    // memory KVM maps.
    fd: VmFd,
    kvm: Arc<Kvm>,
    ram: GuestRam,
    mappings: Vec<Arc<dyn HostMapping>>,
    irqchip: bool,
    /// vCPUs created ahead with this VM (index = vCPU id), until the builder takes them.
    vcpus_ahead: Vec<Option<VcpuFd>>,
    /// The vCPU count the ahead vCPUs' CPUID was set for.
    cpuid_ahead_for: usize,
}

/// Sets the VM's TSS and identity-map addresses (before any vCPU exists: KVM refuses the
/// identity map after).
pub(crate) fn set_system_addresses(fd: &VmFd) -> Result<(), VmError> {
    fd.set_tss_address(
        usize::try_from(KVM_TSS_ADDR)
            .map_err(|_| kvm_err("KVM_SET_TSS_ADDR")(kvm_ioctls::Error::new(libc::EINVAL)))?,
    )
    .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))
}

impl Vm {
    /// Creates a VM over `ram`. With `irqchip`, KVM emulates the PIC, IOAPIC, local APICs and PIT
    /// (what Linux needs); without it `hlt` and interrupts are the VMM's business (the OS-less
    /// guest needs neither).
    pub fn new(
        host: &crate::host::HostContext,
        ram: GuestRam,
        irqchip: bool,
    ) -> Result<Self, VmError> {
        let kvm = host.kvm().clone();
        let mut ahead = host.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if irqchip && !ahead.vcpus.is_empty() {
            // The irqchip must come before any vCPU: this VM cannot have one.
            ahead = crate::host::VmAhead::plain(
                host.kvm().create_vm().map_err(kvm_err("KVM_CREATE_VM"))?,
            );
        }
        let fd = ahead.fd;
        if ahead.vcpus.is_empty() {
            set_system_addresses(&fd)?;
        }
        for (slot, region) in ram.memory().iter().enumerate() {
            let host = ram
                .memory()
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Kvm {
                    what: "locating guest memory",
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let slot_desc = kvm_userspace_memory_region {
                // One slot per RAM range: a handful.
                #[allow(clippy::cast_possible_truncation)]
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which this VM owns and
            // outlives the VM fd (field order), so KVM never sees a dangling address.
            unsafe { fd.set_user_memory_region(slot_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        // After the memory slots: on some hosts (PVM) a slot added while the in-kernel irqchip
        // exists costs milliseconds more.
        if irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        Ok(Self {
            fd,
            kvm,
            ram,
            mappings: Vec::new(),
            irqchip,
            vcpus_ahead: ahead.vcpus.into_iter().map(Some).collect(),
            cpuid_ahead_for: ahead.cpuid_for,
        })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Whether KVM emulates the interrupt controllers.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Creates vCPU `index` (its APIC id).
    pub fn create_vcpu(&mut self, index: usize) -> Result<VcpuFd, VmError> {
        if let Some(fd) = self.vcpus_ahead.get_mut(index).and_then(Option::take) {
            return Ok(fd);
        }
        self.fd
            .create_vcpu(index as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))
    }

    /// Whether vCPU `index` was created ahead with its CPUID already set for `count` vCPUs
    /// (`crate::host::HostContext::create_vms_ahead`).
    pub fn cpuid_set_ahead(&self, index: usize, count: usize) -> bool {
        index < self.vcpus_ahead.len() && self.cpuid_ahead_for == count
    }

    /// Maps `mapping` into guest physical memory at `gpa` as memory slot `slot` (an extra slot
    /// beside RAM, e.g. a profiler region). The VM keeps the mapping alive until after its file
    /// descriptor is closed.
    pub fn add_mapping(
        &mut self,
        slot: u32,
        gpa: u64,
        mapping: Arc<dyn HostMapping>,
    ) -> Result<(), VmError> {
        let desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: mapping.byte_len() as u64,
            userspace_addr: mapping.host_addr() as u64,
            flags: 0,
        };
        // SAFETY: `mapping` is kept in `self.mappings`, which is dropped after `self.fd`, so
        // KVM never sees the memory unmapped while the slot exists.
        unsafe { self.fd.set_user_memory_region(desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        self.mappings.push(mapping);
        Ok(())
    }

    /// Number of memory slots holding RAM (extra slots start after them).
    pub fn ram_slots(&self) -> u32 {
        u32::try_from(self.ram.ranges().len()).unwrap_or(u32::MAX)
    }

    /// True when `addr` is guest RAM.
    pub fn is_ram(&self, addr: u64) -> bool {
        self.ram.memory().address_in_range(GuestAddress(addr))
    }
}
