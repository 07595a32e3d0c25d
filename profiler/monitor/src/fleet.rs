//! Every running VM of a run directory, attached and aggregated: what `vmm top` and
//! `vmm prometheus` watch. VMs that appear are opened, VMs that end are drained and dropped,
//! stale and unreadable file sets are reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::comm_text;
use crate::model::{Model, ModelConfig};
use crate::open::{Batch, OpenVm, VmStatus};
use crate::rundir::{scan, StaleVm, VmId};

/// How long an ended VM stays listed in [`Fleet::ended`].
pub const ENDED_KEEP: Duration = Duration::from_secs(10);

/// Static facts about an attached VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    /// Name (metadata, sanitised) or `vm-PID-N`.
    pub name: String,
    /// `linux`, `workload` or empty.
    pub guest: String,
    /// vCPUs (host region).
    pub vcpus: u32,
    /// Wall-clock start, ms since the epoch (0 if unknown).
    pub started_unix_ms: u64,
    /// Why its guest region did not validate (the VM is shown from its host region only).
    pub guest_error: Option<String>,
}

/// Every VM of a run directory.
pub struct Fleet {
    run_dir: PathBuf,
    /// Rates and totals per VM.
    pub model: Model,
    vms: BTreeMap<VmId, OpenVm>,
    /// Facts about each attached VM.
    pub info: BTreeMap<VmId, VmInfo>,
    /// File sets of processes that are gone (or incomplete), from the last scan.
    pub stale: Vec<StaleVm>,
    /// VMs whose files could not be opened or validated, from the last scan.
    pub errors: BTreeMap<VmId, String>,
    /// VMs that ended recently, with why.
    pub ended: Vec<(VmId, String, Instant)>,
    /// Why the last scan failed, if it did.
    pub scan_error: Option<String>,
    /// Windows closed.
    pub ticks: u64,
    /// Warnings not yet shown (e.g. a VM whose guest region is invalid), oldest first.
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("run_dir", &self.run_dir)
            .field("vms", &self.vms.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Watches `run_dir` (nothing is read until [`Fleet::refresh`] or [`Fleet::tick`]).
    pub fn new(run_dir: &Path, cfg: ModelConfig) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            model: Model::new(cfg),
            vms: BTreeMap::new(),
            info: BTreeMap::new(),
            stale: Vec::new(),
            errors: BTreeMap::new(),
            ended: Vec::new(),
            scan_error: None,
            ticks: 0,
            warnings: Vec::new(),
        }
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Ids of the attached VMs.
    pub fn ids(&self) -> impl Iterator<Item = VmId> + '_ {
        self.vms.keys().copied()
    }

    /// An attached VM.
    pub fn vm(&self, id: VmId) -> Option<&OpenVm> {
        self.vms.get(&id)
    }

    /// Scans the run directory: attaches new VMs, notes stale and broken ones.
    pub fn refresh(&mut self) {
        let s = match scan(&self.run_dir) {
            Ok(s) => {
                self.scan_error = None;
                s
            }
            Err(e) => {
                self.scan_error = Some(format!("{}: {e}", self.run_dir.display()));
                return;
            }
        };
        self.stale = s.stale;
        let mut errors = BTreeMap::new();
        for handle in s.live {
            let id = handle.id;
            if self.vms.contains_key(&id) {
                continue;
            }
            match handle.open() {
                Ok(vm) => {
                    let meta = vm.meta().cloned().unwrap_or_default();
                    self.info.insert(
                        id,
                        VmInfo {
                            name: handle.name(),
                            guest: crate::sanitize(meta.guest.as_bytes(), 16),
                            vcpus: vm.vcpu_count(),
                            started_unix_ms: meta.started_unix_ms,
                            guest_error: vm.guest_error().map(str::to_string),
                        },
                    );
                    if let Some(e) = vm.guest_error() {
                        self.warnings.push(format!(
                            "VM {id}: guest region invalid, showing host figures only: {e}"
                        ));
                        // Bounded: a directory of broken VMs cannot grow it without limit.
                        if self.warnings.len() > 100 {
                            self.warnings.remove(0);
                        }
                    }
                    self.model.vm_mut(id);
                    self.vms.insert(id, vm);
                }
                Err(e) => {
                    errors.insert(id, e.to_string());
                }
            }
        }
        self.errors = errors;
    }

    /// Polls every attached VM into the model, names new tasks, and detaches VMs that ended
    /// (after draining them).
    pub fn poll(&mut self) {
        self.poll_observe(|_, _| {});
    }

    /// [`poll`](Self::poll), also handing each VM's [`Batch`] to `observe` right after it was
    /// read and before the model ingests it (benchmarks time when samples reach the reader;
    /// `poll` is this with an observer that does nothing).
    pub fn poll_observe(&mut self, mut observe: impl FnMut(VmId, &Batch)) {
        let mut gone = Vec::new();
        for (id, vm) in self.vms.iter_mut() {
            let status = vm.status();
            let model = self.model.vm_mut(*id);
            match vm.poll() {
                Ok(batch) => {
                    observe(*id, &batch);
                    model.ingest_batch(&batch);
                    model.mem = vm.host_view().mem_sharing();
                    model.paused = vm.host_view().paused();
                }
                Err(e) => {
                    gone.push((*id, e.to_string()));
                    continue;
                }
            }
            for key in model.unnamed_tasks() {
                if let Ok(t) = vm.task(key.task_id) {
                    if t.pid == key.pid {
                        model.set_comm(key, comm_text(&t.comm));
                    }
                }
            }
            if let VmStatus::Ended(why) = status {
                gone.push((*id, why));
            }
        }
        let now = Instant::now();
        for (id, why) in gone {
            self.vms.remove(&id);
            self.info.remove(&id);
            self.model.remove(id);
            self.ended.push((id, why, now));
        }
        self.ended
            .retain(|(_, _, at)| now.duration_since(*at) < ENDED_KEEP);
    }

    /// Takes the warnings not yet shown.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// Closes the model's window (rates, histories).
    pub fn end_window(&mut self) {
        self.model.end_window();
        self.ticks += 1;
    }

    /// [`refresh`](Self::refresh), [`poll`](Self::poll), [`end_window`](Self::end_window).
    pub fn tick(&mut self) {
        self.refresh();
        self.poll();
        self.end_window();
    }
}
