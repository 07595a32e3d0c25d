//! Runs a built VM: one thread per vCPU, the calling thread waits for the end (or a timeout),
//! then kicks every vCPU out of KVM_RUN and collects their accounting.
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
