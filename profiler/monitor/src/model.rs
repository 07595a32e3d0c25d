//! The aggregation model: per VM, per vCPU and per guest task, rates over windows and a history
//! per series (for sparklines). Pure logic: it is fed samples and told when a window ends.
//!
//! - Guest figures come from the guest's ABSOLUTE per-task counters: a window's rate is the
//!   difference between the task's last sample and its last sample of the previous window,
//!   divided by the guest-clock time between them. A counter that goes backwards (a reused task
//!   entry, a lying guest) starts a new baseline instead of yielding a negative or huge rate.
//! - Host figures are deltas per vCPU and interval: a window's rate is their sum divided by the
//!   wall time the window covers (per vCPU: the sum of its intervals; per task and VM: the
//!   longest such sum among the vCPUs). Host costs are charged to the task the guest said was
//!   running ([`TaskKey`] of the host sample); records without a task go to
//!   [`TaskKey::UNATTRIBUTED`].
//! - CPU utilisation is a fraction of one CPU: guest `utime + stime` deltas over guest wall time
//!   for tasks; vCPU-thread `user + sys` over wall time for vCPUs.
//!
//! Everything is bounded: tasks per VM ([`ModelConfig::max_tasks`]; a guest that invents task
//! ids gets its extra samples dropped and counted), vCPUs ([`MAX_VCPUS`]), history length.

use std::collections::{BTreeMap, VecDeque};

use mirrorball_profiler_abi::{GuestSample, HostSample, MAX_VCPUS, SAMPLE_EXITED, TASK_NONE};

use crate::open::Batch;
use crate::rundir::VmId;

/// Limits and history length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Points of history per series.
    pub history: usize,
    /// Most tasks tracked per VM.
    pub max_tasks: usize,
    /// Windows without a sample after which a task is forgotten.
    pub expire_windows: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            history: 120,
            max_tasks: 1024,
            expire_windows: 240,
        }
    }
}

/// A guest task as samples name it: task-table index and pid (the pair tells reuses apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey {
    /// Task-table index, or [`TASK_NONE`].
    pub task_id: u32,
    /// Guest thread id.
    pub pid: u32,
}

impl TaskKey {
    /// Where host costs go when no registered task was running.
    pub const UNATTRIBUTED: TaskKey = TaskKey {
        task_id: TASK_NONE,
        pid: 0,
    };

    /// The key of a host sample's attributed task.
    pub fn of_host(s: &HostSample) -> Self {
        if s.task_id == TASK_NONE {
            Self::UNATTRIBUTED
        } else {
            Self {
                task_id: s.task_id,
                pid: s.pid,
            }
        }
    }

    /// True for [`TaskKey::UNATTRIBUTED`].
    pub fn is_unattributed(&self) -> bool {
        self.task_id == TASK_NONE
    }
}

/// The last `cap` values of a series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    values: VecDeque<f64>,
    cap: usize,
}

impl History {
    /// An empty history of at most `cap` points.
    pub fn new(cap: usize) -> Self {
        Self {
            values: VecDeque::with_capacity(cap.min(4096)),
            cap,
        }
    }

    /// Appends a value, dropping the oldest if full.
    pub fn push(&mut self, v: f64) {
        if self.cap == 0 {
            return;
        }
        while self.values.len() >= self.cap {
            self.values.pop_front();
        }
        self.values.push_back(if v.is_finite() { v } else { 0.0 });
    }

    /// Oldest first.
    pub fn values(&self) -> impl ExactSizeIterator<Item = f64> + '_ {
        self.values.iter().copied()
    }

    /// The most recent value.
    pub fn last(&self) -> Option<f64> {
        self.values.back().copied()
    }

    /// Points held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Sums of host deltas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTotals {
    /// KVM `pf_taken`.
    pub pf_taken: u64,
    /// KVM `pf_fixed`.
    pub pf_fixed: u64,
    /// KVM exits.
    pub exits: u64,
    /// Host minor faults of the vCPU thread.
    pub host_min_flt: u64,
    /// Host major faults of the vCPU thread.
    pub host_maj_flt: u64,
    /// vCPU-thread user time, ns.
    pub utime_ns: u64,
    /// vCPU-thread system time, ns.
    pub stime_ns: u64,
    /// vCPU-thread host run-queue wait (steal), ns.
    pub wait_ns: u64,
    /// Interval covered, ns.
    pub interval_ns: u64,
    /// Samples summed.
    pub samples: u64,
    /// Of those, samples attributed exactly (`ATTR_EXACT`: only this task ran in them).
    pub exact_samples: u64,
    /// Copy-on-write breaks in the task's own memory (from memory records, `ATTR_MEMORY`;
    /// those are not counted in `samples`).
    pub cow_breaks: u64,
}

impl HostTotals {
    /// How the figures were attributed: `exact` (every sample), `sampled` (none), `mixed`.
    pub fn attribution(&self) -> &'static str {
        match (self.samples, self.exact_samples) {
            (0, _) => "-",
            (n, e) if e == n => "exact",
            (_, 0) => "sampled",
            _ => "mixed",
        }
    }

    /// Adds one host sample.
    pub fn add(&mut self, s: &HostSample) {
        self.cow_breaks = self.cow_breaks.saturating_add(s.cow_breaks);
        if s.attr_flags & mirrorball_profiler_abi::ATTR_MEMORY != 0 {
            return;
        }
        self.pf_taken = self.pf_taken.saturating_add(s.pf_taken);
        self.pf_fixed = self.pf_fixed.saturating_add(s.pf_fixed);
        self.exits = self.exits.saturating_add(s.exits);
        self.host_min_flt = self.host_min_flt.saturating_add(s.host_min_flt);
        self.host_maj_flt = self.host_maj_flt.saturating_add(s.host_maj_flt);
        self.utime_ns = self.utime_ns.saturating_add(s.vcpu_utime_ns);
        self.stime_ns = self.stime_ns.saturating_add(s.vcpu_stime_ns);
        self.wait_ns = self.wait_ns.saturating_add(s.vcpu_wait_ns);
        self.interval_ns = self.interval_ns.saturating_add(s.interval_ns);
        self.samples = self.samples.saturating_add(1);
        if s.attr_flags & mirrorball_profiler_abi::ATTR_EXACT != 0 {
            self.exact_samples = self.exact_samples.saturating_add(1);
        }
    }

    /// Host faults, minor + major.
    pub fn host_flt(&self) -> u64 {
        self.host_min_flt.saturating_add(self.host_maj_flt)
    }

    /// vCPU-thread CPU time, ns.
    pub fn cpu_ns(&self) -> u64 {
        self.utime_ns.saturating_add(self.stime_ns)
    }
}

fn per_s(count: u64, wall_ns: u64) -> f64 {
    if wall_ns == 0 {
        0.0
    } else {
        count as f64 * 1e9 / wall_ns as f64
    }
}

fn frac(ns: u64, wall_ns: u64) -> f64 {
    if wall_ns == 0 {
        0.0
    } else {
        ns as f64 / wall_ns as f64
    }
}

/// A task's rates over the last window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TaskRates {
    /// Guest minor faults per second.
    pub min_flt: f64,
    /// Guest major faults per second.
    pub maj_flt: f64,
    /// KVM `pf_taken` (EPT/MMU faults) per second charged to the task.
    pub ept: f64,
    /// Host faults of vCPU threads per second charged to the task.
    pub host_flt: f64,
    /// Guest CPU: `utime + stime` per guest second (fraction of one CPU).
    pub cpu: f64,
    /// Host vCPU-thread CPU charged to the task per second (fraction of one CPU).
    pub vcpu: f64,
}

/// History of a task's rates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskHistory {
    /// Guest minor faults/s.
    pub min_flt: History,
    /// Guest major faults/s.
    pub maj_flt: History,
    /// `pf_taken`/s.
    pub ept: History,
    /// Host faults/s.
    pub host_flt: History,
    /// Guest CPU fraction.
    pub cpu: History,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GuestPoint {
    ts: u64,
    min: u64,
    maj: u64,
    cpu_ns: u64,
}

/// One guest task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskStats {
    /// Its key.
    pub key: TaskKey,
    /// Command name from the task table (sanitised), once known.
    pub comm: Option<String>,
    /// vCPU of its last guest sample.
    pub cpu: u32,
    /// Its last guest sample said it exited.
    pub exited: bool,
    /// Guest minor faults (absolute, last sample).
    pub min_flt: u64,
    /// Guest major faults (absolute).
    pub maj_flt: u64,
    /// Guest user time, ns (absolute).
    pub utime_ns: u64,
    /// Guest system time, ns (absolute).
    pub stime_ns: u64,
    /// Host costs charged to it since the model started.
    pub host: HostTotals,
    /// Rates over the last window.
    pub rates: TaskRates,
    /// Rate history.
    pub history: TaskHistory,
    /// Guest samples seen.
    pub guest_samples: u64,
    /// Times its counters went backwards (new baseline).
    pub resets: u64,
    last_seen: u64,
    mark: Option<GuestPoint>,
    last: Option<GuestPoint>,
    window: HostTotals,
}

impl TaskStats {
    fn new(key: TaskKey, cap: usize, now: u64) -> Self {
        Self {
            key,
            comm: None,
            cpu: mirrorball_profiler_abi::CPU_NONE,
            exited: false,
            min_flt: 0,
            maj_flt: 0,
            utime_ns: 0,
            stime_ns: 0,
            host: HostTotals::default(),
            rates: TaskRates::default(),
            history: TaskHistory {
                min_flt: History::new(cap),
                maj_flt: History::new(cap),
                ept: History::new(cap),
                host_flt: History::new(cap),
                cpu: History::new(cap),
            },
            guest_samples: 0,
            resets: 0,
            last_seen: now,
            mark: None,
            last: None,
            window: HostTotals::default(),
        }
    }

    /// The name to show: the command name, or `?` until it is known.
    pub fn label(&self) -> String {
        if self.key.is_unattributed() {
            return "(no task)".into();
        }
        match &self.comm {
            Some(c) if !c.is_empty() => c.clone(),
            _ => "?".into(),
        }
    }

    /// Guest faults, minor + major (absolute).
    pub fn guest_faults(&self) -> u64 {
        self.min_flt.saturating_add(self.maj_flt)
    }
}

/// A vCPU's rates over the last window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VcpuRates {
    /// vCPU-thread `user + sys` over wall time (fraction of one CPU).
    pub util: f64,
    /// User part.
    pub user: f64,
    /// System part.
    pub sys: f64,
    /// `pf_taken`/s.
    pub ept: f64,
    /// `pf_fixed`/s.
    pub pf_fixed: f64,
    /// Exits/s.
    pub exits: f64,
    /// Host faults/s of the vCPU thread.
    pub host_flt: f64,
}

/// History of a vCPU's rates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VcpuHistory {
    /// Utilisation.
    pub util: History,
    /// `pf_taken`/s.
    pub ept: History,
    /// Exits/s.
    pub exits: History,
    /// Host faults/s.
    pub host_flt: History,
}

/// One vCPU (host figures only).
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuStats {
    /// vCPU index.
    pub index: u32,
    /// Totals since the model started.
    pub totals: HostTotals,
    /// Rates over the last window.
    pub rates: VcpuRates,
    /// Rate history.
    pub history: VcpuHistory,
    /// Task of its last host sample.
    pub last_task: TaskKey,
    /// Attribution flags of its last host sample.
    pub last_attr_flags: u32,
    window: HostTotals,
}

/// A VM's rates over the last window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VmRates {
    /// Guest minor faults/s, all tasks.
    pub min_flt: f64,
    /// Guest major faults/s.
    pub maj_flt: f64,
    /// `pf_taken`/s, all vCPUs.
    pub ept: f64,
    /// Exits/s.
    pub exits: f64,
    /// Host faults/s of the vCPU threads.
    pub host_flt: f64,
    /// Guest CPU of all tasks (CPUs).
    pub guest_cpu: f64,
    /// vCPU-thread CPU of all vCPUs (CPUs).
    pub vcpu_util: f64,
}

/// History of a VM's rates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmHistory {
    /// Guest faults/s (minor + major).
    pub guest_flt: History,
    /// `pf_taken`/s.
    pub ept: History,
    /// Host faults/s.
    pub host_flt: History,
    /// vCPU-thread CPU.
    pub vcpu_util: History,
    /// Guest CPU.
    pub guest_cpu: History,
}

/// One VM.
#[derive(Clone, Debug, PartialEq)]
pub struct VmModel {
    /// Its id.
    pub id: VmId,
    /// Tasks by key.
    pub tasks: BTreeMap<TaskKey, TaskStats>,
    /// vCPUs by index.
    pub vcpus: BTreeMap<u32, VcpuStats>,
    /// Rates over the last window.
    pub rates: VmRates,
    /// Rate history.
    pub history: VmHistory,
    /// Host totals, all vCPUs.
    pub host: HostTotals,
    /// Guest records lost.
    pub lost_guest: u64,
    /// Host records lost.
    pub lost_host: u64,
    /// Guest samples ingested.
    pub guest_samples: u64,
    /// Host samples ingested.
    pub host_samples: u64,
    /// Samples dropped because the task table of the model was full, or the vCPU index was
    /// out of range.
    pub dropped: u64,
    /// Windows closed.
    pub windows: u64,
    /// The VM's memory sharing as the VMM last published it (`None` before its first scan).
    pub mem: Option<mirrorball_profiler_abi::MemSharingFigures>,
    /// Whether the VMM published the VM as paused (host header `vm_state`, ABI minor 3).
    pub paused: bool,
    cfg: ModelConfig,
    evicted_in: Option<u64>,
}

impl VmModel {
    /// An empty model of VM `id`.
    pub fn new(id: VmId, cfg: ModelConfig) -> Self {
        let h = || History::new(cfg.history);
        Self {
            id,
            tasks: BTreeMap::new(),
            vcpus: BTreeMap::new(),
            rates: VmRates::default(),
            history: VmHistory {
                guest_flt: h(),
                ept: h(),
                host_flt: h(),
                vcpu_util: h(),
                guest_cpu: h(),
            },
            host: HostTotals::default(),
            lost_guest: 0,
            lost_host: 0,
            guest_samples: 0,
            host_samples: 0,
            dropped: 0,
            windows: 0,
            mem: None,
            paused: false,
            cfg,
            evicted_in: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> ModelConfig {
        self.cfg
    }

    fn task_mut(&mut self, key: TaskKey) -> Option<&mut TaskStats> {
        let now = self.windows;
        if !self.tasks.contains_key(&key) && self.tasks.len() >= self.cfg.max_tasks {
            // Full: forget tasks not seen in this window, at most once per window.
            if self.evicted_in != Some(now) {
                self.evicted_in = Some(now);
                self.tasks.retain(|_, t| t.last_seen >= now);
            }
            if self.tasks.len() >= self.cfg.max_tasks {
                return None;
            }
        }
        let cap = self.cfg.history;
        let task = self
            .tasks
            .entry(key)
            .or_insert_with(|| TaskStats::new(key, cap, now));
        task.last_seen = now;
        Some(task)
    }

    /// Adds a guest sample (absolute counters of one task).
    pub fn ingest_guest(&mut self, s: &GuestSample) {
        self.guest_samples = self.guest_samples.saturating_add(1);
        let key = TaskKey {
            task_id: s.task_id,
            pid: s.pid,
        };
        let Some(t) = self.task_mut(key) else {
            self.dropped = self.dropped.saturating_add(1);
            return;
        };
        let p = GuestPoint {
            ts: s.timestamp_ns,
            min: s.min_flt,
            maj: s.maj_flt,
            cpu_ns: s.utime_ns.saturating_add(s.stime_ns),
        };
        if let Some(l) = t.last {
            if p.ts < l.ts || p.min < l.min || p.maj < l.maj || p.cpu_ns < l.cpu_ns {
                t.resets = t.resets.saturating_add(1);
                t.mark = Some(p);
            }
        }
        if t.mark.is_none() {
            t.mark = Some(p);
        }
        t.last = Some(p);
        t.min_flt = s.min_flt;
        t.maj_flt = s.maj_flt;
        t.utime_ns = s.utime_ns;
        t.stime_ns = s.stime_ns;
        t.cpu = s.cpu;
        t.exited = s.flags & SAMPLE_EXITED != 0;
        t.guest_samples = t.guest_samples.saturating_add(1);
    }

    /// Adds a host sample (one vCPU's deltas over one interval).
    pub fn ingest_host(&mut self, s: &HostSample) {
        self.host_samples = self.host_samples.saturating_add(1);
        if s.vcpu >= MAX_VCPUS {
            self.dropped = self.dropped.saturating_add(1);
            return;
        }
        let cap = self.cfg.history;
        let v = self.vcpus.entry(s.vcpu).or_insert_with(|| VcpuStats {
            index: s.vcpu,
            totals: HostTotals::default(),
            rates: VcpuRates::default(),
            history: VcpuHistory {
                util: History::new(cap),
                ept: History::new(cap),
                exits: History::new(cap),
                host_flt: History::new(cap),
            },
            last_task: TaskKey::UNATTRIBUTED,
            last_attr_flags: 0,
            window: HostTotals::default(),
        });
        v.totals.add(s);
        v.window.add(s);
        v.last_task = TaskKey::of_host(s);
        v.last_attr_flags = s.attr_flags;
        self.host.add(s);
        match self.task_mut(TaskKey::of_host(s)) {
            Some(t) => {
                t.host.add(s);
                t.window.add(s);
            }
            None => self.dropped = self.dropped.saturating_add(1),
        }
    }

    /// Adds everything a poll returned.
    pub fn ingest_batch(&mut self, b: &Batch) {
        self.lost_guest = self.lost_guest.saturating_add(b.lost_guest);
        self.lost_host = self.lost_host.saturating_add(b.lost_host);
        for r in &b.guest {
            self.ingest_guest(&r.record);
        }
        for r in &b.host {
            self.ingest_host(&r.record);
        }
    }

    /// Sets a task's command name (if the model tracks the task).
    pub fn set_comm(&mut self, key: TaskKey, comm: String) {
        if let Some(t) = self.tasks.get_mut(&key) {
            t.comm = Some(comm);
        }
    }

    /// Keys of tracked tasks whose name is not known yet.
    pub fn unnamed_tasks(&self) -> Vec<TaskKey> {
        self.tasks
            .values()
            .filter(|t| t.comm.is_none() && !t.key.is_unattributed())
            .map(|t| t.key)
            .collect()
    }

    /// Ends the current window: computes every rate, appends the histories, forgets tasks not
    /// seen for [`ModelConfig::expire_windows`] windows.
    pub fn end_window(&mut self) {
        let wall = self
            .vcpus
            .values()
            .map(|v| v.window.interval_ns)
            .max()
            .unwrap_or(0);
        let mut vm = VmRates::default();
        for v in self.vcpus.values_mut() {
            let w = v.window;
            let iv = w.interval_ns;
            v.rates = VcpuRates {
                util: frac(w.cpu_ns(), iv),
                user: frac(w.utime_ns, iv),
                sys: frac(w.stime_ns, iv),
                ept: per_s(w.pf_taken, iv),
                pf_fixed: per_s(w.pf_fixed, iv),
                exits: per_s(w.exits, iv),
                host_flt: per_s(w.host_flt(), iv),
            };
            v.history.util.push(v.rates.util);
            v.history.ept.push(v.rates.ept);
            v.history.exits.push(v.rates.exits);
            v.history.host_flt.push(v.rates.host_flt);
            v.window = HostTotals::default();
            vm.ept += v.rates.ept;
            vm.exits += v.rates.exits;
            vm.host_flt += v.rates.host_flt;
            vm.vcpu_util += v.rates.util;
        }
        for t in self.tasks.values_mut() {
            let (mut min, mut maj, mut cpu) = (0.0, 0.0, 0.0);
            if let (Some(m), Some(l)) = (t.mark, t.last) {
                if l.ts > m.ts {
                    let dt = l.ts - m.ts;
                    min = per_s(l.min.saturating_sub(m.min), dt);
                    maj = per_s(l.maj.saturating_sub(m.maj), dt);
                    cpu = frac(l.cpu_ns.saturating_sub(m.cpu_ns), dt);
                }
                t.mark = Some(l);
            }
            let w = t.window;
            t.rates = TaskRates {
                min_flt: min,
                maj_flt: maj,
                ept: per_s(w.pf_taken, wall),
                host_flt: per_s(w.host_flt(), wall),
                cpu,
                vcpu: frac(w.cpu_ns(), wall),
            };
            t.window = HostTotals::default();
            t.history.min_flt.push(t.rates.min_flt);
            t.history.maj_flt.push(t.rates.maj_flt);
            t.history.ept.push(t.rates.ept);
            t.history.host_flt.push(t.rates.host_flt);
            t.history.cpu.push(t.rates.cpu);
            vm.min_flt += t.rates.min_flt;
            vm.maj_flt += t.rates.maj_flt;
            vm.guest_cpu += t.rates.cpu;
        }
        self.rates = vm;
        self.history.guest_flt.push(vm.min_flt + vm.maj_flt);
        self.history.ept.push(vm.ept);
        self.history.host_flt.push(vm.host_flt);
        self.history.vcpu_util.push(vm.vcpu_util);
        self.history.guest_cpu.push(vm.guest_cpu);
        self.windows += 1;
        let now = self.windows;
        let expire = self.cfg.expire_windows;
        self.tasks
            .retain(|_, t| t.last_seen.saturating_add(expire) >= now);
    }
}

/// Models of several VMs.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// VMs by id.
    pub vms: BTreeMap<VmId, VmModel>,
    cfg: ModelConfig,
}

impl Model {
    /// An empty model.
    pub fn new(cfg: ModelConfig) -> Self {
        Self {
            vms: BTreeMap::new(),
            cfg,
        }
    }

    /// The model of VM `id`, created empty if new.
    pub fn vm_mut(&mut self, id: VmId) -> &mut VmModel {
        let cfg = self.cfg;
        self.vms.entry(id).or_insert_with(|| VmModel::new(id, cfg))
    }

    /// Forgets a VM.
    pub fn remove(&mut self, id: VmId) {
        self.vms.remove(&id);
    }

    /// Ends the window of every VM.
    pub fn end_window(&mut self) {
        for vm in self.vms.values_mut() {
            vm.end_window();
        }
    }
}

#[cfg(test)]
mod tests;
