//! From a configuration to a VM whose vCPUs are ready to run: `linux` boots a kernel,
//! `workload` the embedded OS-less guest. Both produce a [`BuiltVm`].
use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::cpuid::{self, HostKind};
use crate::devices::{BusExits, DeviceError, LegacyDevices};
use crate::loader::LoadError;
use crate::profiling::regions::{ProfilerRegions, RegionError};
use crate::profiling::sampler::SampledVcpu;
use crate::vstate::memory::MemoryError;
use crate::vstate::vcpu::{Vcpu, VmControl};
use crate::vstate::vm::{Vm, VmError};
use crate::workload::{TaskSpec, WorkloadError, WorkloadMonitor};

pub mod linux;
pub mod workload;

/// Most vCPUs one VM may have.
pub const MAX_VCPUS: usize = 64;

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// vCPU count out of range.
    #[error("--vcpus must be between 1 and {max}, got {given}")]
    VcpuCount {
        /// Count asked for.
        given: usize,
        /// Most allowed for this kind of guest.
        max: usize,
    },
    /// Memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The workload guest.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
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
    Vcpu(usize, String),
    /// The profiler regions could not be published.
    #[error(transparent)]
    Profiler(#[from] RegionError),
    /// The wake-up eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// What kind of guest a [`BuiltVm`] runs, with what the VMM keeps to report on it.
pub enum Guest {
    /// A Linux kernel.
    Linux {
        /// Serial console and i8042.
        devices: LegacyDevices,
        /// The command line given to the kernel (with what the VMM appended).
        cmdline: String,
    },
    /// The OS-less workload.
    Workload {
        /// Task progress.
        monitor: Arc<WorkloadMonitor>,
        /// The tasks, one per vCPU.
        specs: Vec<TaskSpec>,
    },
}

/// The profiler of a VM: its published regions and what the host sampler reads per vCPU.
pub struct Profiling {
    /// The guest and host regions (shared with readers for as long as they hold a clone).
    pub regions: Arc<ProfilerRegions>,
    /// Per-vCPU stats fds and thread ids.
    pub vcpus: Vec<SampledVcpu>,
    /// Sampling period (the host's default).
    pub period: std::time::Duration,
    /// The profiler device's control block (Linux guests): the guest may request a period.
    pub control: Option<Arc<mirrorball_devices::ProfilerControl>>,
    /// Where the guest's announced task switches go (exact attribution).
    pub switches: Arc<crate::profiling::sampler::TaskSwitches>,
    /// How per-task figures are attributed.
    pub attribution: crate::profiling::sampler::AttributionMode,
}

impl Profiling {
    /// Chooses how per-task figures are attributed (before the VM runs).
    pub fn set_attribution(&mut self, mode: crate::profiling::sampler::AttributionMode) {
        self.attribution = mode;
        self.switches.set_mode(mode);
    }
}

/// A VM ready to start.
pub struct BuiltVm {
    /// The VM.
    pub vm: Vm,
    /// Its vCPUs, not yet running.
    pub vcpus: Vec<Vcpu>,
    /// Shared control block.
    pub control: Arc<VmControl>,
    /// Port/MMIO dispatch (and its unhandled-access counters).
    pub exits: Arc<BusExits>,
    /// The guest.
    pub guest: Guest,
    /// The host kind the VM was configured for.
    pub host: HostKind,
    /// The profiler, when its regions could be published.
    pub profiling: Option<Profiling>,
}

/// Sets CPUID on a new vCPU (what KVM supports, filtered for the guest and the host kind) and
/// returns what the guest will really see: a PVM host puts some host features back.
pub(crate) fn configure_cpuid(
    vm: &Vm,
    vcpu: &VcpuFd,
    index: usize,
    count: usize,
    host: HostKind,
) -> Result<CpuId, BuildError> {
    let err =
        |what: &str, e: &dyn std::fmt::Display| BuildError::Vcpu(index, format!("{what}: {e}"));
    let mut cpuid = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| err("KVM_GET_SUPPORTED_CPUID", &e))?;
    cpuid::filter_cpuid(&mut cpuid, index as u8, count as u8, host)
        .map_err(|e| err("CPUID filter", &e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| err("KVM_SET_CPUID2", &e))?;
    vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| err("KVM_GET_CPUID2", &e))
}

/// Checks a vCPU count against `max`.
pub(crate) fn check_vcpus(count: usize, max: usize) -> Result<(), BuildError> {
    if count == 0 || count > max {
        return Err(BuildError::VcpuCount { given: count, max });
    }
    Ok(())
}
