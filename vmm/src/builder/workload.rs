//! A VM that runs the embedded OS-less workload guest: one user-mode task per vCPU (or several
//! taking turns). Its memory image (the guest program, its page tables, GDT and the data sets of
//! `read` tasks) is the same for every VM of one layout and can live in a template; each VM writes
//! its own parameter block and gets its vCPUs and profiler regions.
use std::sync::Arc;
use std::time::Duration;

use mirrorball_workload::PROFILER_REGION_GPA;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::{gdt, layout, paging, regs};
use crate::devices::BusExits;
use crate::profiling::cow_charges::RangeOwner;
use crate::profiling::sharing::{AccountedRange, SharingScanner};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{ExitHandler, Vcpu, VmControl};
use crate::vstate::vm::Vm;
use crate::workload::{self, ProfilerParams, TaskSpec, WorkloadLayout, WorkloadMonitor};

use super::platform::PlatformAllocator;
use super::{
    check_vcpus, configure_cpuid, publish_profiler_regions, BuildError, BuiltVm, Guest, Profiling,
    VmResources, MAX_VCPUS,
};
use crate::profiling::regions::RegionRequest;

/// The OS-less workload: its tasks, on how many vCPUs, in how much RAM.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// The tasks; task `i` runs on vCPU `i % vcpus`, taking turns by iteration.
    pub specs: Vec<TaskSpec>,
    /// vCPUs.
    pub vcpus: usize,
    /// RAM, if given (at least what the tasks need).
    pub mem_bytes: Option<u64>,
    /// Profiler sampling period; `None` leaves the profiler out.
    pub profile_period: Option<Duration>,
}

impl WorkloadConfig {
    pub(super) fn check(&self) -> Result<(), BuildError> {
        check_vcpus(self.vcpus, MAX_VCPUS.min(self.specs.len().max(1)))?;
        self.ram_bytes().map(|_| ())
    }

    fn layout(&self) -> Result<WorkloadLayout, BuildError> {
        Ok(workload::layout(&self.specs, self.vcpus)?)
    }

    pub(super) fn ram_bytes(&self) -> Result<u64, BuildError> {
        let needed = self.layout()?.ram_bytes;
        match self.mem_bytes {
            Some(given) if given < needed => Err(BuildError::WorkloadMemory {
                given: given >> 20,
                needed: needed.div_ceil(1 << 20),
            }),
            Some(given) => Ok(given),
            None => Ok(needed),
        }
    }

    /// The template holds the task regions (data sets for `read` tasks) where the layout puts
    /// them; what each task does with its region is in the per-VM parameter block.
    pub(super) fn template_key(&self) -> Result<Vec<(&'static str, String)>, BuildError> {
        let layout = self.layout()?;
        let regions: Vec<String> = layout
            .tasks
            .iter()
            .zip(&layout.data_sets)
            .map(|(t, &data)| {
                let data = if data { " data set" } else { "" };
                format!("{} MiB{data}", t.region_bytes >> 20)
            })
            .collect();
        Ok(vec![("task regions", format!("[{}]", regions.join(", ")))])
    }
}

/// Builds one workload VM of `specs` on `vcpus` vCPUs with memory of its own (`mem_bytes`, or
/// what the tasks need), profiled every `profile_period`, its regions published in `run_dir`.
pub fn build(
    specs: Vec<TaskSpec>,
    vcpus: usize,
    mem_bytes: Option<u64>,
    profile_period: Option<Duration>,
    run_dir: &std::path::Path,
) -> Result<BuiltVm, BuildError> {
    let config = super::GuestConfig::Workload(WorkloadConfig {
        specs,
        vcpus,
        mem_bytes,
        profile_period,
    });
    super::build_single(&config, super::ConsoleSink::Null, run_dir)
}

/// What writing a workload image produced.
#[derive(Clone, Debug)]
pub struct WorkloadImage {
    /// Where everything is.
    pub plan: WorkloadLayout,
    /// The guest program's entry point.
    pub entry: u64,
}

/// Writes the guest program, GDT, page tables and data sets into `mem`.
pub(super) fn write_image(
    config: &WorkloadConfig,
    mem: &GuestMemoryMmap,
) -> Result<WorkloadImage, BuildError> {
    let plan = config.layout()?;
    let ram_bytes = config.ram_bytes()?;
    let boot = |e: &dyn std::fmt::Display| BuildError::Boot(e.to_string());
    gdt::write_gdt_and_tss(mem).map_err(|e| boot(&e))?;
    let top = crate::vstate::memory::ram_ranges(ram_bytes)
        .iter()
        .map(|(s, l)| s + l)
        .max()
        .unwrap_or(0);
    paging::write_identity_map(
        mem,
        layout::WORKLOAD_PAGE_TABLES,
        // At least 4 GiB so the doorbell in the device hole is mapped.
        top.div_ceil(1 << 30).max(4),
        layout::WORKLOAD_MAX_PDS,
        true,
    )
    .map_err(|e| boot(&e))?;
    let entry = workload::load_image(mem)?;
    workload::write_data_sets(mem, &plan)?;
    Ok(WorkloadImage { plan, entry })
}

/// The ranges the sharing accounting follows per task: its region.
fn task_ranges(plan: &WorkloadLayout, vcpus: usize) -> Vec<AccountedRange> {
    plan.tasks
        .iter()
        .enumerate()
        .map(|(index, t)| AccountedRange {
            index,
            owner: Some(RangeOwner {
                pid: u32::try_from(index + 1).unwrap_or(u32::MAX),
                vcpu: u32::try_from(crate::workload::task_vcpu(index, vcpus)).unwrap_or(0),
            }),
            gpa: t.region_gpa,
            len: t.region_bytes.div_ceil(4096) * 4096,
        })
        .collect()
}

/// Builds the VM around RAM that holds `image`.
pub(super) fn assemble(
    config: &WorkloadConfig,
    ram: GuestRam,
    image: &WorkloadImage,
    resources: VmResources,
) -> Result<BuiltVm, BuildError> {
    let host = resources.host;
    let vcpu_count = config.vcpus;
    let specs = config.specs.clone();
    // This VM's own tasks: the template fixed where their regions are (and their data sets), not
    // what they do.
    let plan = config.layout()?;
    let sharing = SharingScanner::new(&ram, task_ranges(&plan, vcpu_count));
    let mem = ram.memory().clone();
    let mut vm = Vm::new(&host, ram, false)?;
    let mut platform = PlatformAllocator::new(vm.ram_slots());
    let regions = match config.profile_period {
        Some(period) => Some(publish_profiler_regions(
            &mut vm,
            &host,
            platform.memslot(),
            &RegionRequest {
                vm_name: resources.name.clone(),
                kind: "workload",
                vcpus: vcpu_count,
                tasks: Some(specs.len()),
                period,
            },
        )?),
        None => None,
    };
    let control = Arc::new(VmControl::new(vcpu_count).map_err(BuildError::EventFd)?);
    let exits = Arc::new(BusExits::empty());
    let task_vcpus = (0..specs.len())
        .map(|t| workload::task_vcpu(t, vcpu_count))
        .collect();
    let monitor = Arc::new(WorkloadMonitor::with_vcpus(task_vcpus, exits.clone()));
    let mut vcpus = Vec::with_capacity(vcpu_count);
    for index in 0..vcpu_count {
        let fd = vm.create_vcpu(index)?;
        if !vm.cpuid_set_ahead(index, vcpu_count) {
            configure_cpuid(&host, &fd, index, vcpu_count)?;
        }
        if index == 0 {
            let tsc_khz = fd.get_tsc_khz().map_or(0, u64::from);
            let profiler = regions
                .as_ref()
                .map_or(ProfilerParams::default(), |r| ProfilerParams {
                    gpa: PROFILER_REGION_GPA,
                    len: r.guest.len() as u64,
                    tsc_khz,
                });
            workload::write_params(&mem, &plan, profiler)?;
        }
        let state = regs::EntryState::UserMode {
            rip: image.entry,
            rsp: workload::stack_top(index),
            arg0: index as u64,
            arg1: mirrorball_workload::PARAMS_GPA,
        };
        regs::set_entry_state(&fd, state, layout::WORKLOAD_PAGE_TABLES)
            .map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        let handler: Arc<dyn ExitHandler> = monitor.clone();
        vcpus.push(Vcpu::new(index, fd, handler, control.clone(), mem.clone()));
    }
    let profiling = regions.map(|regions| {
        let period = config.profile_period.unwrap_or_default();
        let p = Profiling::new(regions, &mut vcpus, period, None);
        // The guest's per-iteration doorbell is its task switch: it rings after a task's turn,
        // before the next task names itself in the slot.
        monitor.set_switch_sink(p.switches.clone());
        p
    });
    Ok(BuiltVm {
        name: resources.name,
        vm,
        vcpus,
        control,
        exits,
        guest: Guest::Workload {
            monitor,
            specs,
            layout: plan,
        },
        host: host.kind(),
        profiling,
        sharing,
    })
}
