//! One VM's life after it is built: start the vCPUs, wait on the event loop, collect the
//! accounting into a [`RunReport`].
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::MutEventSubscriber;
use mirrorball_devices::serial::SerialInput;
use mirrorball_profiler::kvm_stats::StatsFd;
use mirrorball_profiler_abi::validate_guest_region;

use crate::builder::{BuiltVm, Guest};
use crate::profiling::attribution::{guest_totals_by_pid, totals_by_pid};
use crate::profiling::regions::ProfilerRegions;
use crate::profiling::sampler::Sampler;
use crate::report::{task_reports, GuestRegionReport, RunReport};
use crate::runner::{self, RunError, WaitOptions};

/// How to run a built VM.
pub struct SessionOptions<'a> {
    /// End the VM after this long.
    pub timeout: Option<Duration>,
    /// Set by a signal handler to end the VM as interrupted.
    pub interrupted: &'a AtomicBool,
    /// Feed the VMM's stdin to the guest's serial console (Linux guests).
    pub console_input: bool,
    /// Called with the profiler regions after the sampler stopped (tests keep them to read).
    pub keep_regions: Option<&'a dyn Fn(Arc<ProfilerRegions>)>,
}

/// Runs `built` to its end.
pub fn run(built: BuiltVm, options: SessionOptions<'_>) -> Result<RunReport, RunError> {
    let BuiltVm {
        vm,
        vcpus,
        control,
        exits,
        guest,
        host,
        profiling,
    } = built;
    let vm_stats = StatsFd::for_vm(vm.fd()).ok();
    let vm_baseline = vm_stats.as_ref().and_then(|s| s.read().ok());
    let mut subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = Vec::new();
    let mut reset = None;
    if let Guest::Linux { devices, .. } = &guest {
        reset = Some(devices.reset_evt.try_clone().map_err(RunError::EventFd)?);
        if options.console_input {
            let input = SerialInput::stdin(devices.serial.clone())
                .map_err(|e| RunError::Console(e.to_string()))?;
            subscribers.push(Arc::new(Mutex::new(input)));
        }
    }
    let vcpu_count = vcpus.len();
    let running = runner::start(vcpus, control)?;
    let started = running.started();
    let mut profiler_name = None;
    let mut device_control = None;
    let sampler = match profiling {
        Some(p) => {
            profiler_name = Some(p.regions.name.clone());
            if let Some(control) = &p.control {
                device_control = Some(control.clone());
            }
            let sampler = Sampler::spawn(
                p.regions.clone(),
                p.vcpus,
                p.period,
                p.control,
                p.attribution,
            )
            .map_err(RunError::Sampler)?;
            Some((sampler, p.regions))
        }
        None => None,
    };
    let (end, mut vcpu_reports) = runner::wait(
        running,
        WaitOptions {
            timeout: options.timeout,
            interrupted: options.interrupted,
            reset,
            subscribers,
        },
    );
    let elapsed_ns = started.elapsed().as_nanos() as u64;
    let mut attributed = None;
    let mut guest_region = None;
    let mut guest_min_flt = None;
    let sampler = sampler.map(|(s, regions)| {
        let report = s.stop();
        attributed = regions.host.region().ok().map(|r| totals_by_pid(r).0);
        if let Ok(region) = regions.guest.region() {
            let validated = validate_guest_region(region);
            guest_region = Some(GuestRegionReport::new(&validated));
            guest_min_flt = Some(
                validated
                    .map(|view| guest_totals_by_pid(&view))
                    .unwrap_or_default(),
            );
        }
        if let Some(keep) = options.keep_regions {
            keep(regions);
        }
        report
    });
    vcpu_reports.sort_by_key(|r| r.index);
    let vm_kvm_stats = match (&vm_stats, &vm_baseline) {
        (Some(stats), Some(base)) => stats
            .read()
            .map(|now| now.delta_since(base))
            .unwrap_or_default(),
        _ => Default::default(),
    };
    let (pio, mmio) = exits.unhandled();
    let (guest_name, tasks) = match &guest {
        Guest::Linux { .. } => ("linux", Vec::new()),
        Guest::Workload { monitor, specs } => (
            "workload",
            task_reports(
                specs,
                monitor.progress(),
                vcpu_count,
                attributed.as_ref(),
                guest_min_flt.as_ref(),
            ),
        ),
    };
    Ok(RunReport {
        end: (&end).into(),
        guest: guest_name,
        host: host.name().to_string(),
        mem_bytes: vm.ram().size(),
        elapsed_ns,
        vcpus: vcpu_reports,
        vm_kvm_stats,
        unhandled_exits: [("pio", pio), ("mmio", mmio)].into_iter().collect(),
        tasks,
        no_task: attributed
            .as_ref()
            .and_then(|a| a.get(&crate::profiling::attribution::NO_TASK).copied()),
        profiler: profiler_name,
        profiler_device: device_control.map(|c| crate::report::DeviceReport::new(&c)),
        guest_region,
        sampler,
        end_reason: end,
    })
}
