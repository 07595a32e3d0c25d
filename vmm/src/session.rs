//! The life of built VMs: [`start`] runs a VM's vCPUs and its profiler sampler; [`RunningVm`]
//! reports its status and is stopped or ends on its own; [`RunningVm::finish`] collects what it
//! did into a [`RunReport`]. [`run_all`] drives any number of VMs from one event loop on the
//! calling thread (their end notifications, the i8042 resets, the console input, timeouts,
//! interrupts and the periodic sharing scans) until every VM has ended; one VM that fails ends
//! alone and the others go on.
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use mirrorball_devices::serial::SerialInput;
use mirrorball_profiler::kvm_stats::StatsFd;
use mirrorball_profiler_abi::validate_guest_region;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::cpuid::HostKind;
use crate::builder::{BuiltVm, Guest};
use crate::control::server::{self as control_server, ControlSocket, Inbox, SocketPath};
use crate::devices::BusExits;
use crate::exit::VmEnd;
use crate::profiling::attribution::{guest_totals_by_pid, totals_by_pid};
use crate::profiling::regions::ProfilerRegions;
use crate::profiling::sampler::Sampler;
use crate::profiling::sharing::SharingScanner;
use crate::report::{task_reports, GuestRegionReport, RunReport};
use crate::runner::{self, RunError, RunningVcpus};
use crate::vstate::vcpu::VmControl;
use crate::vstate::vm::Vm;

mod control;
mod snapshot;

pub use control::SnapshotWhen;

/// How to run built VMs.
pub struct SessionOptions<'a> {
    /// End each VM this long after it started.
    pub timeout: Option<Duration>,
    /// Set by a signal handler to end every VM as interrupted.
    pub interrupted: &'a AtomicBool,
    /// Feed the VMM's stdin to the serial console of the first Linux VM (the one whose console is
    /// the terminal).
    pub console_input: bool,
    /// Called with each VM's profiler regions after its sampler stopped (tests keep them).
    pub keep_regions: Option<&'a dyn Fn(Arc<ProfilerRegions>)>,
}

/// A started VM.
pub struct RunningVm {
    name: String,
    // Dropped last: the vCPU threads and the sampler are gone by then (see `finish`).
    vm: Vm,
    running: Option<RunningVcpus>,
    control: Arc<VmControl>,
    exits: Arc<BusExits>,
    guest: Guest,
    host: HostKind,
    sampler: Option<(Sampler, Arc<ProfilerRegions>)>,
    device_control: Option<Arc<mirrorball_devices::ProfilerControl>>,
    vm_stats: Option<(StatsFd, mirrorball_profiler::kvm_stats::StatsSample)>,
    sharing: SharingScanner,
    started: Instant,
    /// The control socket (moved into the event loop by `run_all`), its path and its inbox.
    control_socket: Option<ControlSocket>,
    control_path: Option<SocketPath>,
    control_inbox: Option<Inbox>,
    /// Whether the host region says "paused" now.
    published_paused: bool,
    /// `--snapshot-after`/`--snapshot-on`: when and where to take a snapshot (once).
    snapshot_trigger: Option<(control::Trigger, std::path::PathBuf)>,
}

/// Starts `built`: its vCPU threads, then its profiler's sampler.
pub fn start(built: BuiltVm) -> Result<RunningVm, RunError> {
    let BuiltVm {
        name,
        vm,
        vcpus,
        control,
        exits,
        guest,
        host,
        profiling,
        mut sharing,
    } = built;
    let vm_stats = StatsFd::for_vm(vm.fd())
        .ok()
        .and_then(|s| s.read().ok().map(|base| (s, base)));
    if let Some(p) = &profiling {
        sharing.publish_to(p.regions.clone());
    }
    // A baseline before the guest runs: everything the VM gains from here is counted.
    let _ = sharing.scan();
    let running = runner::start(vcpus, control.clone())?;
    let started = running.started();
    let mut device_control = None;
    let sampler = match profiling {
        Some(p) => {
            device_control = p.control.clone();
            let regions = p.regions.clone();
            let cow = sharing.cow_charges();
            match Sampler::spawn(p.regions, p.vcpus, p.period, p.control, p.attribution, cow) {
                Ok(s) => Some((s, regions)),
                Err(e) => {
                    let (_, _) = running.stop(VmEnd::VmmError(format!(
                        "cannot start the profiler sampler: {e}"
                    )));
                    return Err(RunError::Sampler(e));
                }
            }
        }
        None => None,
    };
    let (control_socket, control_path, control_inbox) = match &sampler {
        Some((_, regions)) => {
            let path = regions.host.path().with_extension("ctl");
            match control_server::bind(&path) {
                Ok((socket, path, inbox)) => (Some(socket), Some(path), Some(inbox)),
                Err(e) => {
                    eprintln!("vmm: {name}: no control socket ({}: {e})", path.display());
                    (None, None, None)
                }
            }
        }
        None => (None, None, None),
    };
    Ok(RunningVm {
        name,
        vm,
        running: Some(running),
        control,
        exits,
        guest,
        host,
        sampler,
        device_control,
        vm_stats,
        sharing,
        started,
        control_socket,
        control_path,
        control_inbox,
        published_paused: false,
        snapshot_trigger: None,
    })
}

impl RunningVm {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the VM is ending (it asked to, failed, or was told to stop).
    pub fn is_ending(&self) -> bool {
        self.control.should_stop()
    }

    /// Asks the VM to end with `reason` (the first reason wins).
    pub fn stop(&self, reason: VmEnd) {
        self.control.end(reason);
    }

    /// Time since the vCPUs started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// One round of halt detection: ends the VM if every vCPU rested for good (halted with
    /// interrupts off) since the last round. Halts happen inside KVM_RUN only with the in-kernel
    /// irqchip, which Linux guests have; the OS-less workload's `hlt` reaches the VMM.
    pub fn check_halted(&self) {
        if let (Some(running), Guest::Linux { .. }) = (&self.running, &self.guest) {
            running.check_halted();
        }
    }

    /// Scans the VM's memory sharing if its scan period has passed.
    pub fn scan_sharing(&mut self) {
        self.sharing.scan_if_due();
    }

    /// Stops the vCPUs and the sampler (if still running) and reports what the VM did.
    pub fn finish(mut self, keep_regions: Option<&dyn Fn(Arc<ProfilerRegions>)>) -> RunReport {
        let (end, mut vcpu_reports) = match self.running.take() {
            Some(running) => running.stop(VmEnd::Interrupted),
            None => (VmEnd::VmmError("VM was not running".into()), Vec::new()),
        };
        let elapsed_ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let sharing = self
            .sharing
            .scan()
            .unwrap_or_else(|_| self.sharing.report());
        let mut attributed = None;
        let mut guest_region = None;
        let mut guest_min_flt = None;
        let mut profiler_name = None;
        let sampler = self.sampler.take().map(|(s, regions)| {
            let mut report = s.stop();
            profiler_name = Some(regions.name.clone());
            if let Some((totals, lost)) = regions.host.region().ok().map(totals_by_pid) {
                attributed = Some(totals);
                report.lost_records = lost;
            }
            if let Ok(region) = regions.guest.region() {
                let validated = validate_guest_region(region);
                guest_region = Some(GuestRegionReport::new(&validated));
                guest_min_flt = Some(
                    validated
                        .map(|view| guest_totals_by_pid(&view))
                        .unwrap_or_default(),
                );
            }
            if let Some(keep) = keep_regions {
                keep(regions);
            }
            report
        });
        vcpu_reports.sort_by_key(|r| r.index);
        let vm_kvm_stats = match &self.vm_stats {
            Some((stats, base)) => stats
                .read()
                .map(|now| now.delta_since(base))
                .unwrap_or_default(),
            None => Default::default(),
        };
        let console = match &mut self.guest {
            Guest::Linux {
                console: Some(drain),
                ..
            } => {
                // Bounded: a sink that takes nothing for a second is given up on.
                drain.finish(Duration::from_secs(1));
                let counters = drain.counters();
                Some(crate::report::ConsoleReport {
                    written_bytes: counters.written_bytes(),
                    dropped_bytes: counters.dropped_bytes(),
                })
            }
            _ => None,
        };
        let (pio, mmio) = self.exits.unhandled();
        let vcpu_count = vcpu_reports.len();
        let (guest_name, tasks) = match &self.guest {
            Guest::Linux { .. } => ("linux", Vec::new()),
            Guest::Workload { monitor, specs, .. } => (
                "workload",
                task_reports(
                    specs,
                    monitor.progress(),
                    vcpu_count,
                    attributed.as_ref(),
                    guest_min_flt.as_ref(),
                    Some(&sharing),
                ),
            ),
        };
        RunReport {
            name: self.name.clone(),
            end: (&end).into(),
            guest: guest_name,
            host: self.host.name().to_string(),
            mem_bytes: self.vm.ram().size(),
            elapsed_ns,
            vcpus: vcpu_reports,
            vm_kvm_stats,
            unhandled_exits: [("pio", pio), ("mmio", mmio)].into_iter().collect(),
            tasks,
            memory: Some(sharing),
            profiler: profiler_name,
            no_task: attributed
                .as_ref()
                .and_then(|a| a.get(&crate::profiling::attribution::NO_TASK).copied()),
            profiler_device: self
                .device_control
                .as_ref()
                .map(|c| crate::report::DeviceReport::new(c)),
            guest_region,
            sampler,
            console,
            disk: match &self.guest {
                Guest::Linux {
                    disk: Some(metrics),
                    ..
                } => Some(crate::report::DiskReport::new(metrics)),
                _ => None,
            },
            end_reason: end,
        }
    }

    /// The control socket's path, if the VM has one.
    pub fn control_path(&self) -> Option<&std::path::Path> {
        self.control_path.as_ref().map(SocketPath::path)
    }

    fn watcher(&self) -> Result<EndWatcher, RunError> {
        let reset = match &self.guest {
            Guest::Linux { devices, .. } => {
                Some(devices.reset_evt.try_clone().map_err(RunError::EventFd)?)
            }
            Guest::Workload { .. } => None,
        };
        Ok(EndWatcher {
            control: self.control.clone(),
            wake: self
                .control
                .wake_fd()
                .try_clone()
                .map_err(RunError::EventFd)?,
            reset,
        })
    }
}

/// Watches one VM's end eventfd and, for Linux, its i8042 reset eventfd.
struct EndWatcher {
    control: Arc<VmControl>,
    wake: EventFd,
    reset: Option<EventFd>,
}

impl MutEventSubscriber for EndWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in std::iter::once(&self.wake).chain(self.reset.as_ref()) {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                self.control
                    .end(VmEnd::VmmError(format!("cannot watch an eventfd: {e}")));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if self.reset.as_ref().is_some_and(|r| r.as_raw_fd() == fd) {
            if let Some(r) = &self.reset {
                let _ = r.read();
            }
            self.control.end(VmEnd::GuestReset);
        } else if fd == self.wake.as_raw_fd() {
            let _ = self.wake.read();
        }
    }
}

/// How often the event loop wakes up to check timeouts, the interrupt flag and scan sharing.
const EVENT_LOOP_TICK: Duration = Duration::from_millis(50);

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs `vms` (already started, or failed to start) to their ends from one event loop on the
/// calling thread; returns one report per VM, in order.
pub fn run_all(
    vms: Vec<Result<RunningVm, (String, RunError)>>,
    options: &SessionOptions<'_>,
) -> Vec<Result<RunReport, (String, RunError)>> {
    let mut results: Vec<Option<Result<RunReport, (String, RunError)>>> =
        Vec::with_capacity(vms.len());
    let mut running: Vec<(usize, RunningVm)> = Vec::new();
    for (i, vm) in vms.into_iter().enumerate() {
        match vm {
            Ok(vm) => {
                results.push(None);
                running.push((i, vm));
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut manager: EventManager<Subscriber> = match EventManager::new() {
        Ok(m) => m,
        Err(e) => {
            for (i, vm) in running {
                vm.stop(VmEnd::VmmError(format!(
                    "cannot create the event loop: {e:?}"
                )));
                results[i] = Some(Ok(vm.finish(options.keep_regions)));
            }
            return collect(results);
        }
    };
    let mut console_attached = false;
    let mut control_subs = std::collections::HashMap::new();
    for (i, vm) in running.iter_mut() {
        if let Some(socket) = vm.control_socket.take() {
            control_subs.insert(*i, manager.add_subscriber(Arc::new(Mutex::new(socket))));
        }
        match vm.watcher() {
            Ok(w) => {
                manager.add_subscriber(Arc::new(Mutex::new(w)));
            }
            Err(e) => vm.stop(VmEnd::VmmError(e.to_string())),
        }
        if options.console_input && !console_attached {
            if let Guest::Linux { devices, .. } = &vm.guest {
                console_attached = true;
                match SerialInput::stdin(devices.serial.clone()) {
                    Ok(input) => {
                        manager.add_subscriber(Arc::new(Mutex::new(input)));
                    }
                    Err(e) => vm.stop(VmEnd::VmmError(format!(
                        "cannot attach the console input: {e}"
                    ))),
                }
            }
        }
    }
    let tick_ms = i32::try_from(EVENT_LOOP_TICK.as_millis()).unwrap_or(50);
    let mut next_halt_check = Instant::now() + runner::HALT_CHECK_INTERVAL;
    while !running.is_empty() {
        if Instant::now() >= next_halt_check {
            for (_, vm) in &running {
                vm.check_halted();
            }
            next_halt_check = Instant::now() + runner::HALT_CHECK_INTERVAL;
        }
        if let Err(e) = manager.run_with_timeout(tick_ms) {
            if !matches!(e, event_manager::Error::Epoll(ref errno) if errno.errno() == libc::EINTR)
            {
                for (_, vm) in &running {
                    vm.stop(VmEnd::VmmError(format!("event loop failed: {e:?}")));
                }
            }
        }
        let interrupted = options.interrupted.load(Ordering::SeqCst);
        for (_, vm) in running.iter_mut() {
            if interrupted {
                vm.stop(VmEnd::Interrupted);
            }
            if let Some(t) = options.timeout {
                if vm.uptime() >= t {
                    vm.stop(VmEnd::Timeout {
                        seconds: t.as_secs_f64(),
                    });
                }
            }
            if !vm.is_ending() {
                vm.scan_sharing();
            }
            vm.serve_control();
        }
        let (ended, still): (Vec<_>, Vec<_>) =
            running.into_iter().partition(|(_, vm)| vm.is_ending());
        running = still;
        for (i, mut vm) in ended {
            // Requests that came with the end are answered; the socket closes with the VM.
            vm.serve_control();
            if let Some(id) = control_subs.remove(&i) {
                let _ = manager.remove_subscriber(id);
            }
            results[i] = Some(Ok(vm.finish(options.keep_regions)));
        }
    }
    collect(results)
}

fn collect(
    results: Vec<Option<Result<RunReport, (String, RunError)>>>,
) -> Vec<Result<RunReport, (String, RunError)>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err((String::new(), RunError::NotRun))))
        .collect()
}

/// Runs one built VM to its end.
pub fn run(built: BuiltVm, options: SessionOptions<'_>) -> Result<RunReport, RunError> {
    let name = built.name.clone();
    let started = start(built).map_err(|e| (name, e));
    run_all(vec![started], &options)
        .pop()
        .unwrap_or(Err((String::new(), RunError::NotRun)))
        .map_err(|(_, e)| e)
}
