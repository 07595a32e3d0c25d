//! Builds the embedded OS-less workload guest: one user-mode task per vCPU.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mirrorball_profiler::kvm_stats::StatsFd;
use mirrorball_workload::PROFILER_REGION_GPA;

use crate::arch::x86_64::cpuid::HostKind;
use crate::arch::x86_64::{gdt, layout, paging, regs};
use crate::devices::BusExits;
use crate::profiling::regions::ProfilerRegions;
use crate::profiling::sampler::{AttributionMode, SampledVcpu, TaskSwitches};
use crate::profiling::sizing::RegionSizing;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{ExitHandler, Vcpu, VmControl};
use crate::vstate::vm::Vm;
use crate::workload::{self, ProfilerParams, TaskSpec, WorkloadMonitor};

use super::{check_vcpus, configure_cpuid, BuildError, BuiltVm, Guest, Profiling, MAX_VCPUS};

/// Builds the workload guest: the tasks of `specs` on `vcpu_count` vCPUs (task `i` on vCPU
/// `i % vcpu_count`, taking turns by iteration), in `mem_bytes` of RAM or just as much as the
/// tasks need; with `profile_period`, publishes the profiler regions in
/// `run_dir` and maps the guest region at [`PROFILER_REGION_GPA`].
pub fn build(
    specs: Vec<TaskSpec>,
    vcpu_count: usize,
    mem_bytes: Option<u64>,
    profile_period: Option<Duration>,
    run_dir: &Path,
) -> Result<BuiltVm, BuildError> {
    check_vcpus(vcpu_count, MAX_VCPUS.min(specs.len().max(1)))?;
    let plan = workload::layout(&specs, vcpu_count)?;
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
    let host = HostKind::detect();
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
    let cr3 = paging::write_identity_map(
        mem,
        layout::WORKLOAD_PAGE_TABLES,
        // At least 4 GiB so the doorbell in the device hole is mapped.
        top.div_ceil(1 << 30).max(4),
        layout::WORKLOAD_MAX_PDS,
        true,
    )
    .map_err(|e| boot(&e))?;
    let regions = match profile_period {
        Some(period) => {
            let ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
            let sizing = RegionSizing::for_run(vcpu_count as u32, Some(specs.len() as u32), ns);
            let regions =
                ProfilerRegions::create_sized(run_dir, vcpu_count as u32, "workload", ns, sizing)?;
            // SAFETY: the mapping lives in `regions`, which the BuiltVm keeps (in `profiling`)
            // for as long as the VM.
            unsafe {
                vm.add_memslot(
                    vm.ram_slots(),
                    PROFILER_REGION_GPA,
                    regions.guest.host_addr(),
                    regions.guest.len() as u64,
                )?;
            }
            Some((Arc::new(regions), period))
        }
        None => None,
    };
    let control = Arc::new(VmControl::new(vcpu_count).map_err(BuildError::EventFd)?);
    let exits = Arc::new(BusExits::empty());
    let task_vcpus = (0..specs.len())
        .map(|t| workload::task_vcpu(t, vcpu_count))
        .collect();
    let monitor = Arc::new(WorkloadMonitor::with_vcpus(task_vcpus, exits.clone()));
    let mut vcpus = Vec::with_capacity(vcpu_count);
    let mut entry = None;
    for index in 0..vcpu_count {
        let fd = vm.create_vcpu(index)?;
        configure_cpuid(&vm, &fd, index, vcpu_count, host)?;
        let rip = match entry {
            Some(rip) => rip,
            None => {
                let tsc_khz = fd.get_tsc_khz().map_or(0, u64::from);
                let profiler = regions
                    .as_ref()
                    .map_or(ProfilerParams::default(), |(r, _)| ProfilerParams {
                        gpa: PROFILER_REGION_GPA,
                        len: r.guest.len() as u64,
                        tsc_khz,
                    });
                *entry.insert(workload::load(mem, &plan, profiler)?)
            }
        };
        let state = regs::EntryState::UserMode {
            rip,
            rsp: workload::stack_top(index),
            arg0: index as u64,
            arg1: mirrorball_workload::PARAMS_GPA,
        };
        regs::set_entry_state(&fd, state, cr3)
            .map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        let handler: Arc<dyn ExitHandler> = monitor.clone();
        vcpus.push(Vcpu::new(index, fd, handler, control.clone(), mem.clone()));
    }
    let mut vcpus = vcpus;
    let profiling = regions.map(|(regions, period)| {
        let sampled: Vec<SampledVcpu> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(index, v)| {
                let stats = StatsFd::for_vcpu(v.fd()).ok();
                let sampled = SampledVcpu::new(index, stats, v.tid_handle(), regions.clone());
                v.set_on_start(sampled.start_hook());
                v.set_on_stop(sampled.stop_hook());
                sampled
            })
            .collect();
        // The guest's per-iteration doorbell is its task switch: it rings after a task's turn,
        // before the next task names itself in the slot.
        let switches = Arc::new(TaskSwitches::new(&sampled));
        monitor.set_switch_sink(switches.clone());
        Profiling {
            regions,
            vcpus: sampled,
            period,
            control: None,
            switches,
            attribution: AttributionMode::default(),
        }
    });
    Ok(BuiltVm {
        vm,
        vcpus,
        control,
        exits,
        guest: Guest::Workload { monitor, specs },
        host,
        profiling,
    })
}
