//! Totals per guest task from the host region's ring: what the sampler attributed to each task
//! (by the guest-claimed pid the vCPU slot named when each interval closed), and how.
use std::collections::BTreeMap;

use mirrorball_profiler_abi::{
    validate_host_region, GuestRegionView, Poll, Region, ATTR_EXACT, ATTR_MEMORY, ATTR_MERGED,
    ATTR_SLOT_VALID, VCPU_IDLE,
};

/// The key of [`totals_by_pid`] under which intervals with no task are summed: before the
/// guest named one (boot), idle, slots that could not be read, and merged excess tasks.
pub const NO_TASK: u32 = 0;

/// What the host saw while one guest task ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TaskTotals {
    /// Host minor faults of the vCPU thread.
    pub host_min_flt: u64,
    /// Host major faults of the vCPU thread.
    pub host_maj_flt: u64,
    /// KVM `pf_taken`.
    pub pf_taken: u64,
    /// KVM `exits`.
    pub exits: u64,
    /// vCPU-thread CPU time, ns.
    pub vcpu_cpu_ns: u64,
    /// Host wall time of the intervals charged (the time the task held its vCPU, as the guest's
    /// own clock sees it), ns.
    pub vcpu_wall_ns: u64,
    /// Of that, time the vCPU thread waited on a host run queue (steal), ns: with
    /// `vcpu_cpu_ns` it makes up the wall time a busy task held its vCPU.
    pub vcpu_wait_ns: u64,
    /// Samples attributed.
    pub samples: u64,
    /// Of those, records attributed exactly (every interval in them ran only this task).
    pub exact_samples: u64,
    /// Announced task switches that closed this task's intervals.
    pub switches: u64,
    /// Copy-on-write breaks in the task's own memory (memory records; not counted in `samples`).
    pub cow_breaks: u64,
}

impl TaskTotals {
    /// How the figures were attributed: `"exact"` (every record exact), `"sampled"` (none), or
    /// `"mixed"`; `"-"` with no record.
    pub fn attribution(&self) -> &'static str {
        match (self.samples, self.exact_samples) {
            (0, _) => "-",
            (n, e) if e == n => "exact",
            (_, 0) => "sampled",
            _ => "mixed",
        }
    }
}

/// Sums the host ring's records per attributed guest pid. Records that name no task (pid 0, the
/// idle task, a slot that could not be read, merged excess tasks) are summed under [`NO_TASK`]
/// rather than folded into a task. Also returns the number of records lost.
pub fn totals_by_pid(host: Region<'_>) -> (BTreeMap<u32, TaskTotals>, u64) {
    let mut totals: BTreeMap<u32, TaskTotals> = BTreeMap::new();
    let Ok(view) = validate_host_region(host) else {
        return (totals, 0);
    };
    let ring = view.ring();
    let mut reader = ring.reader();
    let mut lost = 0;
    // Bounded: never more polls than the ring holds records, plus the losses it may report.
    for _ in 0..=u64::from(ring.capacity()).saturating_mul(2) {
        match reader.poll() {
            Poll::Record(r) => {
                let s = r.record;
                let no_task = s.attr_flags & ATTR_SLOT_VALID == 0
                    || s.attr_flags & ATTR_MERGED != 0
                    || s.slot_flags & VCPU_IDLE != 0
                    || s.pid == 0;
                let t = totals
                    .entry(if no_task { NO_TASK } else { s.pid })
                    .or_default();
                if s.attr_flags & ATTR_MEMORY != 0 {
                    t.cow_breaks += s.cow_breaks;
                    continue;
                }
                t.host_min_flt += s.host_min_flt;
                t.host_maj_flt += s.host_maj_flt;
                t.pf_taken += s.pf_taken;
                t.exits += s.exits;
                t.vcpu_cpu_ns += s.vcpu_utime_ns + s.vcpu_stime_ns;
                t.vcpu_wall_ns += s.interval_ns;
                t.vcpu_wait_ns += s.vcpu_wait_ns;
                t.samples += 1;
                t.exact_samples += u64::from(s.attr_flags & ATTR_EXACT != 0);
                t.switches += u64::from(s.switches);
            }
            Poll::Lost { count, .. } => lost += count,
            _ => break,
        }
    }
    (totals, lost)
}

/// What a guest says about one of its tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestTotals {
    /// Minor faults.
    pub min_flt: u64,
    /// CPU time (user + system), ns.
    pub cpu_ns: u64,
}

/// The guest's own minor-fault count and CPU time per pid: the largest among the guest ring's
/// records (its counters are absolute, so the latest is the largest; records already overwritten
/// do not matter). Guest-written and so only as trustworthy as the guest.
pub fn guest_totals_by_pid(view: &GuestRegionView<'_>) -> BTreeMap<u32, GuestTotals> {
    let mut out: BTreeMap<u32, GuestTotals> = BTreeMap::new();
    let ring = view.ring();
    let mut reader = ring.reader();
    for _ in 0..=u64::from(ring.capacity()).saturating_mul(2) {
        match reader.poll() {
            Poll::Record(r) if r.record.pid != 0 => {
                let t = out.entry(r.record.pid).or_default();
                t.min_flt = t.min_flt.max(r.record.min_flt);
                let cpu = r.record.utime_ns.saturating_add(r.record.stime_ns);
                t.cpu_ns = t.cpu_ns.max(cpu);
            }
            Poll::Record(_) | Poll::Lost { .. } => {}
            _ => break,
        }
    }
    out
}
