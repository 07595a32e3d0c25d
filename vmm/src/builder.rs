//! From a configuration to a VM whose vCPUs are ready to run.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::{gdt, layout, paging, regs};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{ExitHandler, Vcpu, VcpuAction, VmControl};
use crate::vstate::vm::{Vm, VmError};
use crate::workload::{self, TaskSpec, WorkloadError, WorkloadMonitor};

/// Most vCPUs one VM may have.
pub const MAX_VCPUS: usize = 64;

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// vCPU count out of range.
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(usize),
    /// Memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The workload guest.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// Memory too small for the requested workload.
    #[error("--mem of {given} MiB is too small for the workload, which needs {needed} MiB")]
    WorkloadMemory {
        /// MiB given.
        given: u64,
        /// MiB needed.
        needed: u64,
    },
    /// Writing boot structures failed.
    #[error("cannot set up guest boot state: {0}")]
    Boot(String),
    /// A vCPU ioctl failed.
    #[error("cannot configure vCPU {0}: {1}")]
    Vcpu(usize, kvm_ioctls::Error),
    /// The wake-up eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Exits the VM has no device for: counted and ignored (reads return all ones).
#[derive(Debug, Default)]
pub struct UnhandledExits {
    /// Port accesses.
    pub pio: AtomicU64,
    /// MMIO accesses.
    pub mmio: AtomicU64,
}

impl ExitHandler for UnhandledExits {
    fn io_in(&self, _: usize, _: u16, data: &mut [u8]) -> VcpuAction {
        data.fill(0xff);
        self.pio.fetch_add(1, Ordering::Relaxed);
        VcpuAction::Continue
    }
    fn io_out(&self, _: usize, _: u16, _: &[u8]) -> VcpuAction {
        self.pio.fetch_add(1, Ordering::Relaxed);
        VcpuAction::Continue
    }
    fn mmio_read(&self, _: usize, _: u64, data: &mut [u8]) -> VcpuAction {
        data.fill(0xff);
        self.mmio.fetch_add(1, Ordering::Relaxed);
        VcpuAction::Continue
    }
    fn mmio_write(&self, _: usize, _: u64, _: &[u8]) -> VcpuAction {
        self.mmio.fetch_add(1, Ordering::Relaxed);
        VcpuAction::Continue
    }
}

/// Sets CPUID on a new vCPU from what KVM supports.
fn configure_cpuid(vm: &Vm, vcpu: &VcpuFd, index: usize) -> Result<(), BuildError> {
    let cpuid = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::Vcpu(index, e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| BuildError::Vcpu(index, e))
}

/// An OS-less workload VM ready to start.
pub struct WorkloadVm {
    /// The VM.
    pub vm: Vm,
    /// Its vCPUs.
    pub vcpus: Vec<Vcpu>,
    /// Shared control block.
    pub control: Arc<VmControl>,
    /// Task progress (also the exit handler).
    pub monitor: Arc<WorkloadMonitor>,
    /// Exits nothing handled.
    pub unhandled: Arc<UnhandledExits>,
    /// The tasks, one per vCPU.
    pub specs: Vec<TaskSpec>,
}

/// Builds the OS-less workload guest with one task (and vCPU) per spec.
pub fn build_workload(
    specs: Vec<TaskSpec>,
    mem_bytes: Option<u64>,
) -> Result<WorkloadVm, BuildError> {
    if specs.is_empty() || specs.len() > MAX_VCPUS {
        return Err(BuildError::VcpuCount(specs.len()));
    }
    let plan = workload::layout(&specs)?;
    let ram_bytes = match mem_bytes {
        Some(given) if given < plan.ram_bytes => {
            return Err(BuildError::WorkloadMemory {
                given: given >> 20,
                needed: plan.ram_bytes.div_ceil(1 << 20),
            })
        }
        Some(given) => given,
        None => plan.ram_bytes,
    };
    let vm = Vm::new(GuestRam::new(ram_bytes)?, false)?;
    let mem = vm.ram().memory();
    let boot = |e: &dyn std::fmt::Display| BuildError::Boot(e.to_string());
    gdt::write_gdt_and_tss(mem).map_err(|e| boot(&e))?;
    let top = vm
        .ram()
        .ranges()
        .iter()
        .map(|(s, l)| s + l)
        .max()
        .unwrap_or(0);
    paging::write_identity_map(
        mem,
        // At least 4 GiB so the doorbell in the device hole is mapped.
        top.div_ceil(1 << 30).max(4),
        layout::WORKLOAD_PD_ADDR,
        layout::WORKLOAD_MAX_PDS,
        true,
    )
    .map_err(|e| boot(&e))?;
    let entry = workload::load(mem, &plan)?;
    let control = Arc::new(VmControl::new(specs.len()).map_err(BuildError::EventFd)?);
    let unhandled = Arc::new(UnhandledExits::default());
    let monitor = Arc::new(WorkloadMonitor::new(specs.len(), unhandled.clone()));
    let mut vcpus = Vec::with_capacity(specs.len());
    for index in 0..specs.len() {
        let fd = vm.create_vcpu(index)?;
        configure_cpuid(&vm, &fd, index)?;
        let state = regs::EntryState::UserMode {
            rip: entry,
            rsp: workload::stack_top(index),
            arg0: index as u64,
            arg1: mirrorball_workload::PARAMS_GPA,
        };
        regs::set_entry_state(&fd, state).map_err(|e| BuildError::Vcpu(index, e))?;
        let handler: Arc<dyn ExitHandler> = monitor.clone();
        vcpus.push(Vcpu::new(index, fd, handler, control.clone(), mem.clone()));
    }
    Ok(WorkloadVm {
        vm,
        vcpus,
        control,
        monitor,
        unhandled,
        specs,
    })
}
