//! A VM's vCPU threads: one thread per vCPU, started together; stopping kicks every vCPU out of
//! KVM_RUN and collects their accounting. The event loop that decides when is the session's.
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mirrorball_profiler::vcpu_accounting::VcpuReport;
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
    /// The VM could not be built (refused alone; the other VMs of a fleet run).
    #[error("{0}")]
    Build(String),
    /// The snapshot it was to be restored from was refused (exit code 22, as `vmm --restore`).
    #[error("{0}")]
    Snapshot(String),
    /// The VM was never started.
    #[error("the VM was not started")]
    NotRun,
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
    /// When the vCPUs started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// One round of halt detection ([`crate::vstate::halt`]): ends the VM with
    /// [`VmEnd::GuestHalted`] if every vCPU rested for good since the last round, else kicks
    /// them all so that each records its state again.
    pub fn check_halted(&self) {
        if self.control.pause_requested() {
            // Parked vCPUs record no rest: a paused VM has not halted.
            return;
        }
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

    /// Asks every vCPU to park and kicks them out of KVM_RUN until all are parked or `wait`
    /// passed (a kick that lands just before KVM_RUN is lost, hence the repeats); returns
    /// whether the VM is fully paused. A VM still pausing parks on its own at the vCPUs' next
    /// exit.
    pub fn pause(&self, wait: Duration) -> bool {
        self.control.request_pause();
        let deadline = Instant::now() + wait;
        loop {
            if self.control.all_parked() {
                return true;
            }
            if Instant::now() >= deadline || self.control.should_stop() {
                return false;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// vCPU threads started.
    pub fn count(&self) -> usize {
        self.threads.len()
    }

    /// Lets the parked vCPUs run again.
    pub fn resume(&self) {
        self.control.resume();
    }

    fn kick_all(&self) {
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
        let deadline = Instant::now() + VCPU_EXIT_GRACE;
        for (index, handle) in self.threads.into_iter().enumerate() {
            // Kick until the thread leaves KVM_RUN; a kick that lands just before the thread
            // enters KVM_RUN would otherwise be lost.
            while !handle.is_finished() && Instant::now() < deadline {
                let _ = handle.kill(kick_signal());
                std::thread::sleep(Duration::from_micros(500));
            }
            if !handle.is_finished() {
                // Stuck in the host kernel, deaf to the kick (what the nested test bed's
                // hangs may be): waiting for it would hang the whole process, so it is left
                // behind and ends with the process.
                eprintln!(
                    "vCPU {index} did not leave KVM_RUN within {} s of the VM's end; left behind \
                     without its report",
                    VCPU_EXIT_GRACE.as_secs()
                );
                continue;
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

/// How long a stop waits for the vCPU threads to leave KVM_RUN before it leaves them behind.
pub const VCPU_EXIT_GRACE: Duration = Duration::from_secs(5);

/// How often the vCPUs are kicked to check whether they halted for good.
pub const HALT_CHECK_INTERVAL: Duration = Duration::from_millis(500);
