//! From a guest configuration and the resources a VM is given to a VM whose vCPUs are ready to
//! run. One builder serves every guest: [`build`] takes a [`GuestConfig`] (a Linux kernel, or the
//! embedded OS-less workload) and [`VmResources`] (memory backing, console sink, the process's
//! [`HostContext`]); the guest kinds differ only in how they write their memory image (`linux`,
//! `workload`) and which devices and registers they need. An image is written either into a VM's
//! own fresh memory or once into a sealed template ([`prepare_shared_image`]) whose clones map it
//! copy-on-write.
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::cpuid::{self, HostKind};
use crate::devices::{BusExits, DeviceError, LegacyDevices};
use crate::host::HostContext;
use crate::loader::LoadError;
use crate::profiling::regions::{ProfilerRegions, RegionError, RegionRequest};
use crate::profiling::sampler::SampledVcpu;
use crate::profiling::sharing::SharingScanner;
use crate::vstate::memory::{GuestRam, MemoryError, Template, TemplateBuilder};
use crate::vstate::vcpu::{Vcpu, VmControl};
use crate::vstate::vm::{Vm, VmError};
use crate::workload::{TaskSpec, WorkloadError, WorkloadMonitor};
use mirrorball_workload::PROFILER_REGION_GPA;

pub mod console;
pub mod disk;
pub mod linux;
pub mod platform;
pub mod workload;

pub use console::ConsoleSink;
pub use linux::LinuxConfig;
pub use workload::WorkloadConfig;

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
    /// Platform resources (MMIO windows, interrupt lines).
    #[error(transparent)]
    Platform(#[from] platform::PlatformError),
    /// The userfaultfd pager (`--pager uffd`).
    #[error(transparent)]
    Pager(#[from] crate::budget::uffd::PagerError),
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
    /// The console sink could not be opened.
    #[error("cannot open the console log {path}: {source}")]
    Console {
        /// The log file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A lazy restore's loader cannot take the VM's memory.
    #[error("lazy restore: cannot register guest memory with userfaultfd: {0}")]
    Lazy(std::io::Error),
    /// A VM's guest does not match the template it was to be cloned from.
    #[error("--share template needs identical guests: {0}")]
    TemplateMismatch(String),
}

/// What to run in a VM.
#[derive(Clone, Debug)]
pub enum GuestConfig {
    /// Boot a Linux kernel.
    Linux(LinuxConfig),
    /// Run the embedded OS-less workload.
    Workload(WorkloadConfig),
}

impl GuestConfig {
    /// "linux" or "workload".
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Linux(_) => "linux",
            Self::Workload(_) => "workload",
        }
    }

    /// vCPUs.
    pub fn vcpus(&self) -> usize {
        match self {
            Self::Linux(c) => c.vcpus,
            Self::Workload(c) => c.vcpus,
        }
    }

    /// Profiler sampling period (`None`: profiler off).
    pub fn profile_period(&self) -> Option<Duration> {
        match self {
            Self::Linux(c) => c.profile_period,
            Self::Workload(c) => c.profile_period,
        }
    }

    /// Bytes of guest RAM the VM gets.
    pub fn ram_bytes(&self) -> Result<u64, BuildError> {
        match self {
            Self::Linux(c) => Ok(c.mem_bytes),
            Self::Workload(c) => c.ram_bytes(),
        }
    }

    /// Checks what can be checked before anything is created.
    pub fn check(&self) -> Result<(), BuildError> {
        match self {
            Self::Linux(c) => c.check(),
            Self::Workload(c) => c.check(),
        }
    }

    /// What a template prepared for this guest depends on, as (what, value) pairs: VMs may share
    /// a template only when these are equal.
    pub fn template_key(&self) -> Result<Vec<(&'static str, String)>, BuildError> {
        let mut key = vec![
            ("guest", self.kind_name().to_string()),
            ("memory size", format!("{} MiB", self.ram_bytes()? >> 20)),
        ];
        match self {
            Self::Linux(c) => key.extend(c.template_key()),
            Self::Workload(c) => key.extend(c.template_key()?),
        }
        Ok(key)
    }

    /// Writes what every VM of this configuration holds in memory (kernel, initramfs, boot
    /// structures; or the workload image, page tables and data sets) into `ram`.
    fn write_image(
        &self,
        mem: &vm_memory::GuestMemoryMmap,
        ranges: &[(u64, u64)],
        host: &HostContext,
    ) -> Result<Image, BuildError> {
        match self {
            Self::Linux(c) => linux::write_image(c, mem, ranges, host).map(Image::Linux),
            Self::Workload(c) => workload::write_image(c, mem).map(Image::Workload),
        }
    }
}

/// What writing a guest's image produced that building its VMs needs.
#[derive(Clone, Debug)]
pub enum Image {
    /// A Linux guest.
    Linux(linux::LinuxImage),
    /// The OS-less workload.
    Workload(workload::WorkloadImage),
}

/// A template prepared for one guest configuration, with what its clones need to know.
#[derive(Debug)]
pub struct SharedImage {
    /// The sealed memory.
    pub template: Arc<Template>,
    /// What writing it produced.
    pub image: Image,
    key: Vec<(&'static str, String)>,
}

impl SharedImage {
    /// A template whose memory was prepared elsewhere (a snapshot's memory file) for `config`.
    pub fn prepared(
        template: Arc<Template>,
        image: Image,
        config: &GuestConfig,
    ) -> Result<Self, BuildError> {
        Ok(Self {
            template,
            image,
            key: config.template_key()?,
        })
    }

    /// Whether a VM of `config` may be cloned from this template; `Err` says what differs.
    pub fn check_compatible(&self, config: &GuestConfig) -> Result<(), BuildError> {
        let key = config.template_key()?;
        for ((what, ours), (_, theirs)) in self.key.iter().zip(&key) {
            if ours != theirs {
                return Err(BuildError::TemplateMismatch(format!(
                    "{what} {theirs} differs from the template's {ours}"
                )));
            }
        }
        if key.len() != self.key.len() {
            return Err(BuildError::TemplateMismatch(
                "the guest differs from the template's".into(),
            ));
        }
        Ok(())
    }
}

/// Prepares `config`'s memory image once in a template, sealed against writes.
pub fn prepare_shared_image(
    config: &GuestConfig,
    host: &HostContext,
) -> Result<SharedImage, BuildError> {
    config.check()?;
    let key = config.template_key()?;
    let builder = TemplateBuilder::new(config.ram_bytes()?)?;
    let image = config.write_image(builder.memory(), &builder.ranges(), host)?;
    Ok(SharedImage {
        template: Arc::new(builder.seal()?),
        image,
        key,
    })
}

/// Where a VM's memory comes from.
#[derive(Clone, Debug)]
pub enum MemorySource {
    /// Its own fresh memory, with the image written into it.
    Fresh,
    /// A copy-on-write clone of a prepared template.
    Template(Arc<SharedImage>),
    /// Memory of its own whose pages a lazy restore's loader brings in from the prepared
    /// template's file (a snapshot's `memory.bin`) on first touch.
    Lazy(Arc<LazyMemory>),
}

/// What a lazily restored VM's memory comes from.
#[derive(Debug)]
pub struct LazyMemory {
    /// The prepared snapshot (its memory file and image).
    pub image: Arc<SharedImage>,
    /// The loader serving its pages.
    pub loader: Arc<crate::snapshot::lazy::LazyLoader>,
}

/// What a VM is built from, besides its guest configuration.
pub struct VmResources {
    /// The VM's name (unique within the process).
    pub name: String,
    /// Its memory backing.
    pub memory: MemorySource,
    /// Where its serial console goes.
    pub console: ConsoleSink,
    /// What all VMs of the process share.
    pub host: Arc<HostContext>,
}

/// What kind of guest a [`BuiltVm`] runs, with what the VMM keeps to report on it.
pub enum Guest {
    /// A Linux kernel.
    Linux {
        /// Serial console and i8042.
        devices: LegacyDevices,
        /// The command line given to the kernel (with what the VMM appended).
        cmdline: String,
        /// The kernel and initramfs files it booted (for a snapshot's record).
        boot_files: (std::path::PathBuf, Option<std::path::PathBuf>),
        /// The thread that drains the console's buffer into its sink, if it has one.
        console: Option<mirrorball_devices::serial::ConsoleDrain>,
        /// The copy-on-write disk's counters, if the VM has one.
        disk: Option<Arc<mirrorball_devices::virtio_blk::DiskMetrics>>,
    },
    /// The OS-less workload.
    Workload {
        /// Task progress.
        monitor: Arc<WorkloadMonitor>,
        /// The tasks, one per vCPU.
        specs: Vec<TaskSpec>,
        /// Where each task's region is, for per-task memory accounting.
        layout: crate::workload::WorkloadLayout,
    },
}

/// The profiler of a VM: its published regions and what the host sampler reads per vCPU.
pub struct Profiling {
    /// The guest and host regions (shared with readers for as long as they hold a clone).
    pub regions: Arc<ProfilerRegions>,
    /// Per-vCPU stats fds and thread ids.
    pub vcpus: Vec<SampledVcpu>,
    /// Sampling period (the host's default).
    pub period: Duration,
    /// The profiler device's control block (Linux guests): the guest may request a period.
    pub control: Option<Arc<mirrorball_devices::ProfilerControl>>,
    /// Where the guest's announced task switches go (exact attribution).
    pub switches: Arc<crate::profiling::sampler::TaskSwitches>,
    /// How per-task figures are attributed.
    pub attribution: crate::profiling::sampler::AttributionMode,
}

impl Profiling {
    /// The profiler of a VM whose guest region is in `regions`: the sampler's hooks wired into
    /// every vCPU and the sink that takes the task switches the guest announces (the caller
    /// connects it to what receives the announcements: the device or the workload doorbell).
    pub(crate) fn new(
        regions: Arc<ProfilerRegions>,
        vcpus: &mut [Vcpu],
        period: Duration,
        control: Option<Arc<mirrorball_devices::ProfilerControl>>,
    ) -> Self {
        let sampled = sampled_vcpus(vcpus, &regions);
        let switches = Arc::new(crate::profiling::sampler::TaskSwitches::new(&sampled));
        Self {
            regions,
            vcpus: sampled,
            period,
            control,
            switches,
            attribution: crate::profiling::sampler::AttributionMode::default(),
        }
    }

    /// Chooses how per-task figures are attributed (before the VM runs).
    pub fn set_attribution(&mut self, mode: crate::profiling::sampler::AttributionMode) {
        self.attribution = mode;
        self.switches.set_mode(mode);
    }
}

/// A VM ready to start.
pub struct BuiltVm {
    /// Its name.
    pub name: String,
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
    /// Counts the VM's shared and private pages.
    pub sharing: SharingScanner,
}

/// Builds one VM of `config` from `resources`.
pub fn build(config: &GuestConfig, resources: VmResources) -> Result<BuiltVm, BuildError> {
    config.check()?;
    let host = resources.host.clone();
    let lazy_loader = match &resources.memory {
        MemorySource::Lazy(lazy) => Some(lazy.loader.clone()),
        _ => None,
    };
    let (ram, image) = match &resources.memory {
        MemorySource::Fresh => {
            let size = config.ram_bytes()?;
            // KSM merges only anonymous pages, and a budget swaps them cleanly: with either,
            // fresh memory is mapped privately.
            let ram = if host.private_ram() {
                GuestRam::new_private(size)?
            } else {
                GuestRam::new(size)?
            };
            let mut ram = ram;
            if let Some(pager) = host.pager() {
                // Before the image is written: its pages count against the budget too.
                ram.attach_pager(pager)?;
            }
            let image = config.write_image(ram.memory(), ram.ranges(), &host)?;
            (ram, image)
        }
        MemorySource::Template(shared) => {
            if host.pager().is_some() {
                return Err(BuildError::Pager(
                    crate::budget::uffd::PagerError::TemplateSharing,
                ));
            }
            shared.check_compatible(config)?;
            (GuestRam::clone_of(&shared.template)?, shared.image.clone())
        }
        MemorySource::Lazy(lazy) => {
            let (shared, loader) = (&lazy.image, &lazy.loader);
            if host.pager().is_some() {
                return Err(BuildError::Pager(
                    crate::budget::uffd::PagerError::LazyRestore,
                ));
            }
            shared.check_compatible(config)?;
            let size = shared.template.size();
            let mut ram = if host.private_ram() {
                GuestRam::new_private(size)?
            } else {
                GuestRam::new(size)?
            };
            ram.attach_lazy(loader).map_err(BuildError::Lazy)?;
            (ram, shared.image.clone())
        }
    };
    if host.ksm() {
        ram.mark_mergeable()?;
    }
    let mut built = match (config, image) {
        (GuestConfig::Linux(c), Image::Linux(image)) => linux::assemble(c, ram, &image, resources),
        (GuestConfig::Workload(c), Image::Workload(image)) => {
            workload::assemble(c, ram, &image, resources)
        }
        _ => Err(BuildError::TemplateMismatch(
            "the guest kind differs from the template's".into(),
        )),
    }?;
    let faults_outside_the_kernel = match lazy_loader {
        Some(loader) => Some(loader.fault_source()),
        None => host.pager().map(|p| p.fault_source()),
    };
    if let Some(source) = faults_outside_the_kernel {
        // The pager's (or the lazy loader's) faults are the vCPU threads' own: charged like
        // the kernel's.
        for vcpu in &mut built.vcpus {
            vcpu.add_fault_source(source.clone());
        }
        for sampled in built.profiling.iter().flat_map(|p| &p.vcpus) {
            sampled.add_fault_source(source.clone());
        }
    }
    Ok(built)
}

/// Builds one VM of `config` with memory of its own, a console sink, and a host context of its
/// own publishing profiler regions in `run_dir` (tests, benches and single-VM tools).
pub fn build_single(
    config: &GuestConfig,
    console: ConsoleSink,
    run_dir: &std::path::Path,
) -> Result<BuiltVm, BuildError> {
    let host = Arc::new(HostContext::new(run_dir, false)?);
    build(
        config,
        VmResources {
            name: "vm0".into(),
            memory: MemorySource::Fresh,
            console,
            host,
        },
    )
}

/// Sets CPUID on a new vCPU (what KVM supports, filtered for the guest and the host kind) and
/// returns what the guest will really see: a PVM host puts some host features back.
pub(crate) fn configure_cpuid(
    host: &HostContext,
    vcpu: &VcpuFd,
    index: usize,
    count: usize,
) -> Result<CpuId, BuildError> {
    let err = |e: String| BuildError::Vcpu(index, e);
    let supported = host.supported_cpuid().map_err(err)?;
    cpuid::set_guest_cpuid(vcpu, &supported, index, count, host.kind()).map_err(err)?;
    vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| err(format!("KVM_GET_CPUID2: {e}")))
}

/// Checks a vCPU count against `max`.
pub(crate) fn check_vcpus(count: usize, max: usize) -> Result<(), BuildError> {
    if count == 0 || count > max {
        return Err(BuildError::VcpuCount { given: count, max });
    }
    Ok(())
}

/// The guest region of a VM's profiler, as a mapping the VM keeps alive.
struct GuestRegionMapping(Arc<ProfilerRegions>);

impl crate::vstate::vm::HostMapping for GuestRegionMapping {
    fn host_addr(&self) -> *mut u8 {
        self.0.guest.host_addr()
    }

    fn byte_len(&self) -> usize {
        self.0.guest.len()
    }
}

/// Publishes the profiler regions `request` describes and maps the guest region into the VM at
/// [`PROFILER_REGION_GPA`] in memory slot `slot`.
pub(crate) fn publish_profiler_regions(
    vm: &mut Vm,
    host: &HostContext,
    slot: u32,
    request: &RegionRequest,
) -> Result<Arc<ProfilerRegions>, BuildError> {
    let regions = Arc::new(ProfilerRegions::for_request(host.run_dir(), request)?);
    vm.add_mapping(
        slot,
        PROFILER_REGION_GPA,
        Arc::new(GuestRegionMapping(regions.clone())),
    )?;
    Ok(regions)
}

/// Wires the sampler's start/stop hooks into each vCPU.
pub(crate) fn sampled_vcpus(
    vcpus: &mut [Vcpu],
    regions: &Arc<ProfilerRegions>,
) -> Vec<SampledVcpu> {
    vcpus
        .iter_mut()
        .enumerate()
        .map(|(index, v)| {
            let stats = mirrorball_profiler::kvm_stats::StatsFd::for_vcpu(v.fd()).ok();
            let sampled = SampledVcpu::new(index, stats, v.thread_handle(), regions.clone());
            v.set_on_start(sampled.start_hook());
            v.set_on_stop(sampled.stop_hook());
            sampled
        })
        .collect()
}
