//! Building and starting VMs on two CPUs — a fleet's fresh VMs, or the clones of a snapshot: the
//! launching thread and one worker take VMs from one queue; each builds its VM (unless the
//! caller built it already), prepares it (a restore writes the snapshot's state into it) and
//! starts it parked at the launch's start gate, so the VMs are let go at one instant however
//! the work was split. Each VM's build and start needs nothing from the others (the template
//! or snapshot they share is ready before), and they are most of a clone's launch cost: on one
//! thread they added about 0.8 ms per VM here.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::builder::{self, BuiltVm, ConsoleSink, GuestConfig, MemorySource, VmResources};
use crate::host::HostContext;
use crate::profiling::sampler::AttributionMode;
use crate::runner::RunError;
use crate::session::{self, RunningVm};
use crate::vstate::first_slice::{self, StartGate};

/// One VM to start: its index in the plan, its name, and what it starts from.
pub struct Job {
    /// Its index in the plan.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// What it starts from.
    pub work: Work,
}

/// What a job starts from.
pub enum Work {
    /// A VM to build.
    Build {
        /// What it runs.
        config: GuestConfig,
        /// Its console.
        console: ConsoleSink,
        /// Its memory, or why there is none (the template could not be prepared).
        memory: Result<MemorySource, String>,
    },
    /// A VM the caller built (to check it before anything starts).
    Built(Box<BuiltVm>),
}

impl Work {
    fn vcpus(&self) -> usize {
        match self {
            Self::Build { config, .. } => config.vcpus(),
            Self::Built(built) => built.vcpus.len(),
        }
    }

    /// The VM named `name`: built on `host` (on the calling thread), or as the caller built it.
    pub fn into_built(self, name: &str, host: &Arc<HostContext>) -> Result<BuiltVm, String> {
        match self {
            Self::Build {
                config,
                console,
                memory,
            } => {
                let resources = VmResources {
                    name: name.to_string(),
                    memory: memory?,
                    console,
                    host: host.clone(),
                };
                builder::build(&config, resources).map_err(|e| e.to_string())
            }
            Self::Built(built) => Ok(*built),
        }
    }
}

/// Run on each VM after its build, before it starts; an error refuses that VM alone.
pub type Prepare = Arc<dyn Fn(&mut BuiltVm) -> Result<(), String> + Send + Sync>;

/// A VM started (parked at the gate) or refused, by its index in the plan.
pub type Launched = (usize, Result<RunningVm, (String, RunError)>);

/// What every job shares.
struct Shared {
    queue: Mutex<VecDeque<Job>>,
    host: Arc<HostContext>,
    gate: Arc<StartGate>,
    attribution: AttributionMode,
    prepare: Option<Prepare>,
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
        let Job { name, work, .. } = job;
        let refused = |e: String| (name.clone(), RunError::Build(e));
        let mut built = work.into_built(&name, &self.host).map_err(refused)?;
        if let Some(p) = built.profiling.as_mut() {
            p.set_attribution(self.attribution);
        }
        if let Some(prepare) = &self.prepare {
            prepare(&mut built).map_err(refused)?;
        }
        if self.first_slice {
            first_slice::give(&mut built.vcpus);
        }
        built.control.set_start_gate(self.gate.clone());
        session::start(built).map_err(|e| (name, e))
    }
}

/// Builds, prepares and starts every job, parked at `gate` (which the caller opens), on this
/// thread and, with more than one job and CPU, on a worker on another CPU.
pub fn build_and_start(
    jobs: Vec<Job>,
    host: &Arc<HostContext>,
    gate: &Arc<StartGate>,
    attribution: AttributionMode,
    prepare: Option<Prepare>,
) -> Vec<Launched> {
    let vcpus: usize = jobs.iter().map(|j| j.work.vcpus()).sum();
    let two = jobs.len() > 1 && std::thread::available_parallelism().map_or(1, usize::from) > 1;
    let shared = Arc::new(Shared {
        queue: Mutex::new(jobs.into()),
        host: host.clone(),
        gate: gate.clone(),
        attribution,
        prepare,
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
