//! Many VMs in one process: a [`FleetPlan`] names each VM with its guest configuration and share
//! mode (from `--vms N` copies or a fleet file), is checked as a whole before anything starts,
//! then [`launch`] prepares one template for the VMs that share one, builds every VM from it (or
//! from memory of its own) and starts them. A VM that cannot be built is reported as refused and
//! the others run.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::builder::{self, BuildError, ConsoleSink, GuestConfig, MemorySource, SharedImage};
use crate::host::HostContext;
use crate::profiling::sampler::AttributionMode;
use crate::runner::RunError;
use crate::session::RunningVm;
use crate::snapshot::restore::RestoreMemory;
use crate::vstate::first_slice;
use crate::vstate::memory::host_ram_bytes;

pub mod file;
pub mod launcher;
pub mod summary;

/// Most VMs one process runs.
pub const MAX_VMS: usize = 64;
/// Most vCPUs of all VMs together.
pub const MAX_TOTAL_VCPUS: usize = 512;

/// How a VM's memory relates to the others'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// A private copy-on-write view of one template prepared for all VMs that share.
    Template,
    /// Memory of its own.
    None,
}

/// Errors in a fleet as a whole: nothing is started when one is found.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// VM count out of range.
    #[error("--vms must be between 1 and {MAX_VMS}, got {0}")]
    VmCount(usize),
    /// Too many vCPUs altogether.
    #[error("the fleet has {0} vCPUs in all; at most {MAX_TOTAL_VCPUS} run in one process")]
    TotalVcpus(usize),
    /// Two VMs have one name.
    #[error("two VMs are named {0:?}: VM names must be unique")]
    DuplicateName(String),
    /// A name that cannot be a file name.
    #[error("VM name {0:?} is not usable: use 1-32 letters, digits, '-' or '_'")]
    BadName(String),
    /// More memory than the host has.
    #[error("guest memory of {needed_mib} MiB in all exceeds the host's {host_mib} MiB of RAM")]
    TooMuchMemory {
        /// MiB needed at the least.
        needed_mib: u64,
        /// MiB the host has.
        host_mib: u64,
    },
    /// One VM's configuration is wrong.
    #[error("VM {name}: {source}")]
    Vm {
        /// The VM.
        name: String,
        /// What is wrong.
        source: BuildError,
    },
    /// The fleet file.
    #[error("fleet file {path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A VM of the fleet file restores a snapshot that cannot be restored (exit code 22, as
    /// `vmm --restore`).
    #[error("fleet file {path}: {why}")]
    Snapshot {
        /// The fleet file.
        path: PathBuf,
        /// The VM and what is wrong with its snapshot.
        why: String,
    },
    /// The log directory.
    #[error("cannot use the log directory {path}: {source}")]
    LogDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One VM of a fleet.
#[derive(Clone, Debug)]
pub struct VmPlan {
    /// Its name.
    pub name: String,
    /// What it runs.
    pub config: GuestConfig,
    /// How its memory is shared.
    pub share: ShareMode,
    /// Restored from this snapshot directory (`config` is then the snapshot's): with `share`
    /// template a copy-on-write clone of its memory, with none memory of its own loaded from
    /// the snapshot on first touch ([`VmPlan::restore_memory`]).
    pub restore: Option<PathBuf>,
}

impl VmPlan {
    /// How a restored VM gets its memory: shared copy-on-write, or its own loaded lazily
    /// (none when the VM is not restored).
    pub fn restore_memory(&self) -> Option<RestoreMemory> {
        self.restore.as_ref().map(|_| match self.share {
            ShareMode::Template => RestoreMemory::Shared,
            ShareMode::None => RestoreMemory::Lazy,
        })
    }
}

/// The VMs of one command.
#[derive(Clone, Debug)]
pub struct FleetPlan {
    /// The VMs, in order.
    pub vms: Vec<VmPlan>,
}

impl FleetPlan {
    /// `count` copies of `config`, named `vm0`, `vm1`, …; sharing one template unless `share`
    /// says otherwise (the default for one VM is memory of its own).
    pub fn copies(
        config: GuestConfig,
        count: usize,
        share: Option<ShareMode>,
    ) -> Result<Self, FleetError> {
        if count == 0 || count > MAX_VMS {
            return Err(FleetError::VmCount(count));
        }
        let share = share.unwrap_or(if count > 1 {
            ShareMode::Template
        } else {
            ShareMode::None
        });
        Ok(Self {
            vms: (0..count)
                .map(|i| VmPlan {
                    name: format!("vm{i}"),
                    config: config.clone(),
                    share,
                    restore: None,
                })
                .collect(),
        })
    }

    /// Checks the fleet as a whole: count, names, each VM's configuration, that the VMs which
    /// share a template are identical guests, and that the host can hold them.
    pub fn check(&self) -> Result<(), FleetError> {
        if self.vms.is_empty() || self.vms.len() > MAX_VMS {
            return Err(FleetError::VmCount(self.vms.len()));
        }
        let mut names = BTreeSet::new();
        let mut vcpus = 0;
        let mut needed = 0u64;
        let mut template: Option<(&VmPlan, Vec<(&'static str, String)>)> = None;
        let mut snapshots = BTreeSet::new();
        for vm in &self.vms {
            check_name(&vm.name)?;
            if !names.insert(vm.name.as_str()) {
                return Err(FleetError::DuplicateName(vm.name.clone()));
            }
            let err = |source| FleetError::Vm {
                name: vm.name.clone(),
                source,
            };
            vm.config.check().map_err(err)?;
            vcpus += vm.config.vcpus();
            let ram = vm.config.ram_bytes().map_err(err)?;
            if let Some(dir) = &vm.restore {
                // One copy of each snapshot's memory, however many clones; a lazy clone's
                // memory is its own.
                if vm.restore_memory() == Some(RestoreMemory::Lazy) || snapshots.insert(dir) {
                    needed = needed.saturating_add(ram);
                }
                continue;
            }
            match vm.share {
                ShareMode::None => needed = needed.saturating_add(ram),
                ShareMode::Template => {
                    let key = vm.config.template_key().map_err(err)?;
                    match &template {
                        None => {
                            needed = needed.saturating_add(ram);
                            template = Some((vm, key));
                        }
                        Some((first, first_key)) => {
                            if let Some(((what, theirs), (_, ours))) =
                                first_key.iter().zip(&key).find(|(a, b)| a != b)
                            {
                                return Err(err(BuildError::TemplateMismatch(format!(
                                    "its {what} ({ours}) differs from {}'s ({theirs})",
                                    first.name
                                ))));
                            }
                        }
                    }
                }
            }
        }
        if vcpus > MAX_TOTAL_VCPUS {
            return Err(FleetError::TotalVcpus(vcpus));
        }
        if let Some(host) = host_ram_bytes() {
            if needed > host {
                return Err(FleetError::TooMuchMemory {
                    needed_mib: needed >> 20,
                    host_mib: host >> 20,
                });
            }
        }
        Ok(())
    }

    /// Whether any VM boots Linux.
    pub fn has_linux(&self) -> bool {
        self.vms
            .iter()
            .any(|v| matches!(v.config, GuestConfig::Linux(_)))
    }
}

fn check_name(name: &str) -> Result<(), FleetError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(FleetError::BadName(name.to_string()))
    }
}

/// Where the VMs' serial consoles go: one Linux VM alone talks to the terminal; in a fleet each
/// Linux VM writes `<log_dir>/<name>.log`.
pub fn consoles(plan: &FleetPlan, log_dir: &Path) -> Result<Vec<ConsoleSink>, FleetError> {
    let linux = plan
        .vms
        .iter()
        .filter(|v| matches!(v.config, GuestConfig::Linux(_)))
        .count();
    if linux > 1 {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(log_dir)
            .map_err(|source| FleetError::LogDir {
                path: log_dir.to_path_buf(),
                source,
            })?;
    }
    Ok(plan
        .vms
        .iter()
        .map(|v| match (&v.config, linux) {
            (GuestConfig::Linux(_), 1) => ConsoleSink::Stdout,
            (GuestConfig::Linux(_), _) => {
                ConsoleSink::File(log_dir.join(format!("{}.log", v.name)))
            }
            (GuestConfig::Workload(_), _) => ConsoleSink::Null,
        })
        .collect())
}

/// Builds and starts every VM of `plan` (checked), with the consoles given and their host
/// figures charged to guest tasks by `attribution`; VMs that share a template are cloned from
/// one prepared for the first of them. A VM that cannot be built or started is returned as an
/// error beside the others.
pub fn launch(
    plan: &FleetPlan,
    consoles: Vec<ConsoleSink>,
    host: &Arc<HostContext>,
    attribution: AttributionMode,
) -> Vec<Result<RunningVm, (String, RunError)>> {
    let mut consoles: Vec<Option<ConsoleSink>> = consoles.into_iter().map(Some).collect();
    let mut results: Vec<Option<Result<RunningVm, (String, RunError)>>> =
        plan.vms.iter().map(|_| None).collect();
    // One restore per snapshot directory and way of restoring its memory.
    let groups: BTreeSet<(&PathBuf, RestoreMemory)> = plan
        .vms
        .iter()
        .filter_map(|v| Some((v.restore.as_ref()?, v.restore_memory()?)))
        .collect();
    for (dir, memory) in groups {
        let index: Vec<usize> = (0..plan.vms.len())
            .filter(|&i| {
                plan.vms[i].restore.as_ref() == Some(dir)
                    && plan.vms[i].restore_memory() == Some(memory)
            })
            .collect();
        let group = FleetPlan {
            vms: index.iter().map(|&i| plan.vms[i].clone()).collect(),
        };
        let sinks = index
            .iter()
            .map(|&i| consoles[i].take().unwrap_or(ConsoleSink::Null))
            .collect();
        // The clones' VMs are created on another CPU while the snapshot is read and checked.
        host.create_vms_ahead(index.len(), None);
        let started = crate::snapshot::restore::load(dir, host).and_then(|loaded| {
            let loaded = Arc::new(loaded);
            crate::snapshot::restore::launch(dir, &loaded, &group, sinks, host, attribution, memory)
        });
        match started {
            Ok(started) => {
                for (&i, vm) in index.iter().zip(started) {
                    results[i] = Some(vm);
                }
            }
            Err(e) => {
                for &i in &index {
                    let refused = RunError::Snapshot(e.to_string());
                    results[i] = Some(Err((plan.vms[i].name.clone(), refused)));
                }
            }
        }
    }
    // Their VMs are created on another CPU while this thread prepares the template.
    // The OS-less guest's VMs (no irqchip) get their vCPUs there too, when they agree on a count.
    let fresh = || plan.vms.iter().filter(|v| v.restore.is_none());
    let vcpus_ahead = fresh()
        .map(|v| match &v.config {
            GuestConfig::Workload(c) => Some(c.vcpus),
            GuestConfig::Linux(_) => None,
        })
        .reduce(|a, b| a.filter(|&n| Some(n) == b))
        .flatten();
    host.create_vms_ahead(fresh().count(), vcpus_ahead);
    let mut shared: Option<Result<Arc<SharedImage>, String>> = None;
    let mut jobs = Vec::with_capacity(plan.vms.len());
    for (index, (vm, console)) in plan.vms.iter().zip(consoles).enumerate() {
        let Some(console) = console.filter(|_| vm.restore.is_none()) else {
            continue;
        };
        let memory = match vm.share {
            ShareMode::None => Ok(MemorySource::Fresh),
            ShareMode::Template => shared
                .get_or_insert_with(|| {
                    builder::prepare_shared_image(&vm.config, host)
                        .map(Arc::new)
                        .map_err(|e| format!("cannot prepare the template: {e}"))
                })
                .clone()
                .map(MemorySource::Template),
        };
        jobs.push(launcher::Job {
            index,
            name: vm.name.clone(),
            work: launcher::Work::Build {
                config: vm.config.clone(),
                console,
                memory,
            },
        });
    }
    // Each VM is started parked at one gate, then all are let go together: a VM whose guest runs
    // would take the CPU from the others' start (and the fleet starts at one instant).
    // (Restored VMs were let go by their own launch.)
    let gate = Arc::new(first_slice::StartGate::default());
    for (index, launched) in launcher::build_and_start(jobs, host, &gate, attribution, None) {
        if let Some(slot) = results.get_mut(index) {
            *slot = Some(launched);
        }
    }
    gate.open();
    results
        .into_iter()
        .zip(&plan.vms)
        .map(|(r, vm)| r.unwrap_or_else(|| Err((vm.name.clone(), RunError::NotRun))))
        .collect()
}
