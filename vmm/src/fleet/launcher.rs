//! Building and starting a fleet's fresh VMs on two CPUs: the launching thread and one worker
//! take VMs from one queue; each builds its VM and starts it parked at the fleet's start gate,
//! so the fleet is let go at one instant however the work was split. Each VM's build and start
//! needs nothing from the others (the template they share is prepared before), and they are most
//! of a clone's launch cost: on one thread they added about 0.8 ms per VM here.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::builder::{self, ConsoleSink, GuestConfig, MemorySource, VmResources};
use crate::host::HostContext;
use crate::profiling::sampler::AttributionMode;
use crate::runner::RunError;
use crate::session::{self, RunningVm};
use crate::vstate::first_slice::{self, StartGate};

/// One VM to build and start: its index in the plan, name, guest and resources (or why it
/// cannot be built).
pub struct Job {
    /// Its index in the fleet plan.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// What it runs.
    pub config: GuestConfig,
    /// Its console.
    pub console: ConsoleSink,
    /// Its memory, or why there is none (the template could not be prepared).
    pub memory: Result<MemorySource, String>,
}

/// A VM started (parked at the gate) or refused, by its index in the plan.
pub type Launched = (usize, Result<RunningVm, (String, RunError)>);

/// What every job shares.
struct Shared {
    queue: Mutex<VecDeque<Job>>,
    host: Arc<HostContext>,
    gate: Arc<StartGate>,
    attribution: AttributionMode,
    /// Give each vCPU a first slice (more vCPUs than CPUs are let go together).
    first_slice: bool,
}

impl Shared {
    fn next(&self) -> Option<Job> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Takes jobs until none is left.
    fn work(&self) -> Vec<Launched> {
        let mut done = Vec::new();
        while let Some(job) = self.next() {
            done.push((job.index, self.launch(job)));
        }
        done
    }

    fn launch(&self, job: Job) -> Result<RunningVm, (String, RunError)> {
        let Job {
            name,
            config,
            console,
            memory,
            ..
        } = job;
        let refused = |e: String| (name.clone(), RunError::Build(e));
        let memory = memory.map_err(refused)?;
        let resources = VmResources {
            name: name.clone(),
            memory,
            console,
            host: self.host.clone(),
        };
        let mut built = builder::build(&config, resources).map_err(|e| refused(e.to_string()))?;
        if let Some(p) = built.profiling.as_mut() {
            p.set_attribution(self.attribution);
        }
        if self.first_slice {
            first_slice::give(&mut built.vcpus);
        }
        built.control.set_start_gate(self.gate.clone());
        session::start(built).map_err(|e| (name, e))
    }
}

/// Builds and starts every job, parked at `gate` (which the caller opens), on this thread and,
/// with more than one job and CPU, on a worker on another CPU.
pub fn build_and_start(
    jobs: Vec<Job>,
    host: &Arc<HostContext>,
    gate: &Arc<StartGate>,
    attribution: AttributionMode,
) -> Vec<Launched> {
    let vcpus: usize = jobs.iter().map(|j| j.config.vcpus()).sum();
    let two = jobs.len() > 1 && std::thread::available_parallelism().map_or(1, usize::from) > 1;
    let shared = Arc::new(Shared {
        queue: Mutex::new(jobs.into()),
        host: host.clone(),
        gate: gate.clone(),
        attribution,
        first_slice: first_slice::needed(vcpus),
    });
    let worker = two
        .then(|| {
            let shared = shared.clone();
            let builder = std::thread::Builder::new().name("vm-launch".into());
            crate::placement::spawn_on_another_cpu(builder, move || shared.work()).ok()
        })
        .flatten();
    let mut launched = shared.work();
    if let Some(worker) = worker {
        // A worker that panicked left its VMs unreported: the caller reports them as not run.
        launched.extend(worker.join().unwrap_or_default());
    }
    launched
}
