//! Runs a built VM: one thread per vCPU; the calling thread runs the event loop (console input,
//! i8042 reset, the VM's end) until the VM ends, a timeout expires or the user interrupts, then
//! kicks every vCPU out of KVM_RUN and collects their accounting.
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use mirrorball_profiler::vcpu_accounting::VcpuReport;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::exit::VmEnd;
use crate::vstate::vcpu::{install_kick_handler, kick_signal, Vcpu, VmControl};

/// Errors starting vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// A thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {0}: {1}")]
    Spawn(usize, std::io::Error),
    /// An eventfd could not be cloned.
    #[error("cannot clone an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The profiler's sampler thread could not start.
    #[error("cannot start the profiler sampler: {0}")]
    Sampler(std::io::Error),
    /// The console input could not be set up.
    #[error("cannot attach the console input: {0}")]
    Console(String),
}

/// vCPU threads of a running VM.
pub struct RunningVcpus {
    control: Arc<VmControl>,
    threads: Vec<JoinHandle<VcpuReport>>,
    started: Instant,
}

/// Starts one thread per vCPU.
pub fn start(vcpus: Vec<Vcpu>, control: Arc<VmControl>) -> Result<RunningVcpus, RunError> {
    install_kick_handler().map_err(RunError::Signal)?;
    let started = Instant::now();
    let mut threads = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || vcpu.run())
            .map_err(|e| RunError::Spawn(i, e))?;
        threads.push(handle);
    }
    Ok(RunningVcpus {
        control,
        threads,
        started,
    })
}

impl RunningVcpus {
    /// The shared control block.
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// When the vCPUs started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether `timeout` (if any) has expired; ends the VM with [`VmEnd::Timeout`] if so.
    pub fn check_timeout(&self, timeout: Option<Duration>) -> bool {
        match timeout {
            Some(t) if self.started.elapsed() >= t => {
                self.control.end(VmEnd::Timeout {
                    seconds: t.as_secs_f64(),
                });
                true
            }
            _ => false,
        }
    }

    /// One round of halt detection ([`crate::vstate::halt`]): ends the VM with
    /// [`VmEnd::GuestHalted`] if every vCPU rested for good since the last round, else kicks
    /// them all so that each records its state again.
    pub fn check_halted(&self) {
        let watch = self.control.halt_watch();
        if watch.stopped_for_good() {
            self.control.end(VmEnd::GuestHalted);
            return;
        }
        watch.new_round();
        for handle in &self.threads {
            if !handle.is_finished() {
                let _ = handle.kill(kick_signal());
            }
        }
    }

    /// Stops every vCPU (if the VM has not ended yet, with `reason`) and returns their reports.
    pub fn stop(self, reason: VmEnd) -> (VmEnd, Vec<VcpuReport>) {
        self.control.end(reason);
        let mut reports = Vec::with_capacity(self.threads.len());
        for handle in self.threads {
            // Kick until the thread leaves KVM_RUN; a kick that lands just before the thread
            // enters KVM_RUN would otherwise be lost.
            while !handle.is_finished() {
                let _ = handle.kill(kick_signal());
                std::thread::sleep(Duration::from_micros(500));
            }
            if let Ok(report) = handle.join() {
                reports.push(report);
            }
        }
        let end = self
            .control
            .reason()
            .unwrap_or_else(|| VmEnd::VmmError("VM ended without a reason".into()));
        (end, reports)
    }
}

/// Watches the VM's end eventfd and, for Linux, the i8042 reset eventfd, from the event loop.
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

/// How the main thread waits for a VM.
pub struct WaitOptions<'a> {
    /// End the VM after this long.
    pub timeout: Option<Duration>,
    /// Set asynchronously (e.g. by a SIGINT handler) to end the VM as interrupted.
    pub interrupted: &'a AtomicBool,
    /// The i8042 reset eventfd, for Linux guests.
    pub reset: Option<EventFd>,
    /// Extra event sources (the serial console's input).
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

/// Runs the event loop on the calling thread until the VM ends, then stops the vCPUs.
pub fn wait(running: RunningVcpus, options: WaitOptions<'_>) -> (VmEnd, Vec<VcpuReport>) {
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        match EventManager::new() {
            Ok(m) => m,
            Err(e) => {
                return running.stop(VmEnd::VmmError(format!(
                    "cannot create the event loop: {e:?}"
                )))
            }
        };
    let control = running.control().clone();
    // Halts happen inside KVM_RUN only with the in-kernel irqchip, which Linux guests (the ones
    // with an i8042 reset) have; the OS-less workload's `hlt` reaches the VMM.
    let halt_checks = options.reset.is_some();
    match control.wake_fd().try_clone() {
        Ok(wake) => {
            let watcher = EndWatcher {
                control: control.clone(),
                wake,
                reset: options.reset,
            };
            manager.add_subscriber(Arc::new(Mutex::new(watcher)));
        }
        Err(e) => return running.stop(VmEnd::VmmError(format!("cannot clone an eventfd: {e}"))),
    }
    for subscriber in options.subscribers {
        manager.add_subscriber(subscriber);
    }
    let mut next_halt_check = Instant::now() + HALT_CHECK_INTERVAL;
    while !control.should_stop() {
        if halt_checks && Instant::now() >= next_halt_check {
            running.check_halted();
            next_halt_check = Instant::now() + HALT_CHECK_INTERVAL;
        }
        if let Err(e) = manager.run_with_timeout(EVENT_LOOP_TICK_MS) {
            if !matches!(e, event_manager::Error::Epoll(ref errno) if errno.errno() == libc::EINTR)
            {
                control.end(VmEnd::VmmError(format!("event loop failed: {e:?}")));
            }
        }
        if options.interrupted.load(Ordering::SeqCst) {
            control.end(VmEnd::Interrupted);
        }
        running.check_timeout(options.timeout);
    }
    running.stop(VmEnd::Interrupted)
}

/// How often the event loop wakes up to check the timeout and the interrupt flag.
const EVENT_LOOP_TICK_MS: i32 = 50;
/// How often the vCPUs are kicked to check whether they halted for good.
const HALT_CHECK_INTERVAL: Duration = Duration::from_millis(500);
