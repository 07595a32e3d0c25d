//! Totals per guest task from the host region's ring: what the sampler attributed to each task
//! (by the guest-claimed pid in the vCPU slot at sampling time).
use std::collections::BTreeMap;

use mirrorball_profiler_abi::{
    validate_host_region, GuestRegionView, Poll, Region, ATTR_SLOT_VALID,
};

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
    /// Samples attributed.
    pub samples: u64,
}

/// Sums the host ring's records per attributed guest pid. Records whose slot could not be read,
/// or that name no task (pid 0), are left out. Also returns the number of records lost.
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
                if s.attr_flags & ATTR_SLOT_VALID == 0 || s.pid == 0 {
                    continue;
                }
                let t = totals.entry(s.pid).or_default();
                t.host_min_flt += s.host_min_flt;
                t.host_maj_flt += s.host_maj_flt;
                t.pf_taken += s.pf_taken;
                t.exits += s.exits;
                t.vcpu_cpu_ns += s.vcpu_utime_ns + s.vcpu_stime_ns;
                t.samples += 1;
            }
            Poll::Lost { count, .. } => lost += count,
            _ => break,
        }
    }
    (totals, lost)
}

/// The guest's own minor-fault count per pid: the largest `min_flt` among the guest ring's
/// records (its counters are absolute, so the latest is the largest; records already overwritten
/// do not matter). Guest-written and so only as trustworthy as the guest.
pub fn guest_min_flt_by_pid(view: &GuestRegionView<'_>) -> BTreeMap<u32, u64> {
    let mut out: BTreeMap<u32, u64> = BTreeMap::new();
    let ring = view.ring();
    let mut reader = ring.reader();
    for _ in 0..=u64::from(ring.capacity()).saturating_mul(2) {
        match reader.poll() {
            Poll::Record(r) if r.record.pid != 0 => {
                let min_flt = out.entry(r.record.pid).or_default();
                *min_flt = (*min_flt).max(r.record.min_flt);
            }
            Poll::Record(_) | Poll::Lost { .. } => {}
            _ => break,
        }
    }
    out
}
