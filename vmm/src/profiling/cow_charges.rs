//! Copy-on-write breaks on their way from the sharing scan to the host ring, per guest task.
//!
//! The sharing scan (on the event loop) finds, per accounted range, how many of its pages became
//! private since the last scan: those are the copy-on-write breaks of the task that owns the
//! range (the OS-less guest's tasks each write only their own region). [`CowCharges`] holds
//! them until the VM's sampler thread, the only writer of the host ring, writes them as memory
//! records (`ATTR_MEMORY`) charged to the task; readers sum them per task like every other
//! host figure. The sampler's last tick, after the final scan, writes what is left, so per-task
//! sums equal the scan's per-range totals exactly.
use std::sync::atomic::{AtomicU64, Ordering};

use mirrorball_profiler_abi::{
    Attribution, HostSample, ATTR_EXACT, ATTR_MEMORY, ATTR_SLOT_VALID, TASK_NONE,
};

/// The owner of an accounted range: the guest task whose writes break its sharing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeOwner {
    /// Guest thread id the task registers with.
    pub pid: u32,
    /// vCPU the task runs on.
    pub vcpu: u32,
}

/// Breaks found by scans and not yet written to the ring, per accounted range.
#[derive(Debug, Default)]
pub struct CowCharges {
    owners: Vec<Option<RangeOwner>>,
    pending: Vec<AtomicU64>,
}

impl CowCharges {
    /// One counter per range, in range order; a range without an owner charges nobody.
    pub fn new(owners: Vec<Option<RangeOwner>>) -> Self {
        let pending = owners.iter().map(|_| AtomicU64::new(0)).collect();
        Self { owners, pending }
    }

    /// Adds `breaks` to range `index` (ignored past the end, for a range without an owner, or
    /// when 0).
    pub fn charge(&self, index: usize, breaks: u64) {
        if breaks == 0 || self.owners.get(index).is_none_or(Option::is_none) {
            return;
        }
        if let Some(p) = self.pending.get(index) {
            p.fetch_add(breaks, Ordering::AcqRel);
        }
    }

    /// Whether guest thread `pid` owns an accounted range.
    pub fn owns(&self, pid: u32) -> bool {
        self.owners.iter().flatten().any(|o| o.pid == pid)
    }

    /// Takes the pending breaks of every range that has some, as memory records stamped
    /// `now_ns`. `task_of(pid)` names the task-table index the guest registered the owner as;
    /// breaks of an owner it does not know yet stay pending, unless `last` (the VM ended: they
    /// are charged to no task rather than lost).
    pub fn take_records(
        &self,
        now_ns: u64,
        last: bool,
        task_of: impl Fn(u32) -> Option<u32>,
    ) -> Vec<HostSample> {
        let mut out = Vec::new();
        let owned = self.owners.iter().zip(&self.pending);
        for (owner, pending) in owned.filter_map(|(o, p)| o.as_ref().map(|o| (o, p))) {
            if pending.load(Ordering::Acquire) == 0 {
                continue;
            }
            let task_id = task_of(owner.pid);
            if task_id.is_none() && !last {
                continue;
            }
            let breaks = pending.swap(0, Ordering::AcqRel);
            let attribution = match task_id {
                Some(task_id) => Attribution {
                    task_id,
                    pid: owner.pid,
                    attr_flags: ATTR_SLOT_VALID | ATTR_EXACT | ATTR_MEMORY,
                    guest_switch_count: 0,
                    slot_flags: 0,
                },
                None => Attribution {
                    task_id: TASK_NONE,
                    pid: 0,
                    attr_flags: ATTR_MEMORY,
                    guest_switch_count: 0,
                    slot_flags: 0,
                },
            };
            let mut record = HostSample {
                timestamp_ns: now_ns,
                vcpu: owner.vcpu,
                cow_breaks: breaks,
                ..Default::default()
            };
            record.set_attribution(&attribution);
            out.push(record);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners() -> CowCharges {
        CowCharges::new(vec![
            Some(RangeOwner { pid: 1, vcpu: 0 }),
            None,
            Some(RangeOwner { pid: 2, vcpu: 1 }),
        ])
    }

    #[test]
    fn pending_breaks_become_one_memory_record_per_known_task() {
        let charges = owners();
        charges.charge(0, 5);
        charges.charge(0, 2);
        charges.charge(1, 50);
        charges.charge(2, 3);
        charges.charge(9, 100);
        let known = |pid: u32| (pid == 1).then_some(7);
        let records = charges.take_records(42, false, known);
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!((r.task_id, r.pid, r.vcpu, r.cow_breaks), (7, 1, 0, 7));
        assert_eq!(r.attr_flags, ATTR_SLOT_VALID | ATTR_EXACT | ATTR_MEMORY);
        assert_eq!((r.interval_ns, r.host_min_flt, r.timestamp_ns), (0, 0, 42));
        assert!(charges.owns(1) && charges.owns(2) && !charges.owns(3));
        // Task 2 is not known yet: its breaks wait, then go to no task at the end.
        assert!(charges.take_records(43, false, known).is_empty());
        let last = charges.take_records(44, true, known);
        assert_eq!(last.len(), 1);
        assert_eq!((last[0].task_id, last[0].cow_breaks), (TASK_NONE, 3));
        assert!(charges.take_records(45, true, known).is_empty());
    }
}
