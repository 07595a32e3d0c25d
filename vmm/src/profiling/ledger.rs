//! The per-vCPU ledger of attributed intervals: where the host sampler's ticks and the guest's
//! announced task switches close a vCPU's open interval and charge it to a task.
//!
//! An interval runs from one close to the next. Whoever closes it (the vCPU thread at a switch
//! the guest announced, or the sampler at a tick) reads the vCPU's counters and its slot in the
//! guest region, and charges the counters' deltas to the task the slot names. A guest announces a
//! switch *before* it names the incoming task, so the slot still names the task that ran. Closed
//! intervals are summed per task until the sampler drains them into host-ring records, so a tick
//! writes one record per task that ran, whatever the switch rate.
use mirrorball_profiler_abi::{
    Attribution, ATTR_AT_SWITCH, ATTR_EXACT, ATTR_MERGED, ATTR_SLOT_BUSY, ATTR_SLOT_VALID,
    ATTR_SWITCHED, TASK_NONE,
};

/// Most tasks one vCPU's ledger tells apart between two ticks; the excess is merged.
pub const MAX_ENTRIES: usize = 64;

/// A vCPU's absolute counters at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Host minor faults of the vCPU thread.
    pub min_flt: u64,
    /// Host major faults of the vCPU thread.
    pub maj_flt: u64,
    /// CPU time of the vCPU thread, ns.
    pub cpu_ns: u64,
    /// KVM `pf_taken`.
    pub pf_taken: u64,
    /// KVM `pf_fixed`.
    pub pf_fixed: u64,
    /// KVM `exits`.
    pub exits: u64,
    /// Time the vCPU thread waited on a host run queue (runnable, not running), ns: the steal
    /// the guest's clock sees and the thread's CPU time does not.
    pub wait_ns: u64,
}

impl Counters {
    /// `self - earlier`, field by field, never below 0.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            min_flt: self.min_flt.saturating_sub(earlier.min_flt),
            maj_flt: self.maj_flt.saturating_sub(earlier.maj_flt),
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            pf_taken: self.pf_taken.saturating_sub(earlier.pf_taken),
            pf_fixed: self.pf_fixed.saturating_sub(earlier.pf_fixed),
            exits: self.exits.saturating_sub(earlier.exits),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
        }
    }

    fn add(&mut self, d: &Counters) {
        self.min_flt = self.min_flt.saturating_add(d.min_flt);
        self.maj_flt = self.maj_flt.saturating_add(d.maj_flt);
        self.cpu_ns = self.cpu_ns.saturating_add(d.cpu_ns);
        self.pf_taken = self.pf_taken.saturating_add(d.pf_taken);
        self.pf_fixed = self.pf_fixed.saturating_add(d.pf_fixed);
        self.exits = self.exits.saturating_add(d.exits);
        self.wait_ns = self.wait_ns.saturating_add(d.wait_ns);
    }
}

/// The intervals charged to one task since the last drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The task, as the slot named it at the last close; `attr_flags` carries how.
    pub attribution: Attribution,
    /// Summed deltas.
    pub sums: Counters,
    /// Summed interval lengths, ns.
    pub interval_ns: u64,
    /// Intervals closed at announced switches.
    pub switches: u32,
}

impl Entry {
    fn same_task(&self, a: &Attribution) -> bool {
        let key = |a: &Attribution| {
            (
                a.task_id,
                a.pid,
                a.slot_flags,
                a.attr_flags & (ATTR_SLOT_VALID | ATTR_SLOT_BUSY | ATTR_MERGED),
            )
        };
        key(&self.attribution) == key(a)
    }
}

/// Where the open interval began.
#[derive(Clone, Copy, Debug)]
struct Open {
    counters: Counters,
    at_ns: u64,
    /// The slot's switch count then (the slot is zeroed before a guest runs).
    switch_count: u64,
    /// Whether it began at an announced switch: then one slot switch inside it is that one.
    announced: bool,
}

/// One vCPU's open interval and the closed ones not yet drained.
#[derive(Debug, Default)]
pub struct Ledger {
    open: Option<Open>,
    entries: Vec<Entry>,
    /// Set once the vCPU thread closed its last interval: nothing more opens.
    stopped: bool,
}

impl Ledger {
    /// Opens the first interval (the vCPU thread, before its first `KVM_RUN`).
    pub fn start(&mut self, counters: Counters, now_ns: u64) {
        if self.stopped {
            return;
        }
        self.open = Some(Open {
            counters,
            at_ns: now_ns,
            switch_count: 0,
            announced: false,
        });
    }

    /// Whether an interval is open (the vCPU thread started and has not stopped).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Closes the open interval at `now` and charges it to `slot` (the attribution read from
    /// the vCPU slot now); `announced` says the guest announced a task switch here, and
    /// `last` that no interval follows (the vCPU thread stops). Without an open interval,
    /// nothing happens.
    pub fn close(
        &mut self,
        now: Counters,
        now_ns: u64,
        slot: Attribution,
        announced: bool,
        last: bool,
    ) {
        let Some(open) = self.open.take() else {
            return;
        };
        let valid = slot.attr_flags & ATTR_SLOT_VALID != 0;
        let allowed = open.switch_count.saturating_add(u64::from(open.announced));
        let exact = valid
            && slot.guest_switch_count >= open.switch_count
            && slot.guest_switch_count <= allowed;
        let mut attribution = slot;
        attribution.attr_flags &= ATTR_SLOT_VALID | ATTR_SLOT_BUSY;
        if attribution.pid == 0 {
            // No task (boot before the guest named one, the idle task): never a table entry.
            attribution.task_id = TASK_NONE;
        }
        if valid && !exact {
            attribution.attr_flags |= ATTR_SWITCHED;
        }
        if exact {
            attribution.attr_flags |= ATTR_EXACT;
        }
        if announced {
            attribution.attr_flags |= ATTR_AT_SWITCH;
        }
        self.charge(
            attribution,
            now.since(&open.counters),
            now_ns.saturating_sub(open.at_ns),
            u32::from(announced),
        );
        // An announced switch the slot does not show yet is still to come in the next
        // interval (a tick closed this one between the announcement and the switch).
        let pending = open.announced && slot.guest_switch_count == open.switch_count;
        if last {
            self.stopped = true;
        } else {
            self.open = Some(Open {
                counters: now,
                at_ns: now_ns,
                switch_count: if valid {
                    slot.guest_switch_count
                } else {
                    open.switch_count
                },
                announced: announced || (valid && pending),
            });
        }
    }

    fn charge(
        &mut self,
        attribution: Attribution,
        sums: Counters,
        interval_ns: u64,
        switches: u32,
    ) {
        let index = match self.entries.iter().position(|e| e.same_task(&attribution)) {
            Some(i) => i,
            None if self.entries.len() < MAX_ENTRIES - 1 => {
                self.entries.push(Entry {
                    attribution,
                    sums: Counters::default(),
                    interval_ns: 0,
                    switches: 0,
                });
                self.entries.len() - 1
            }
            None => {
                // The last entry takes every task beyond the others, attributed to none.
                let merged = Attribution {
                    task_id: TASK_NONE,
                    pid: 0,
                    attr_flags: ATTR_MERGED,
                    guest_switch_count: attribution.guest_switch_count,
                    slot_flags: 0,
                };
                match self.entries.iter().position(|e| e.same_task(&merged)) {
                    Some(i) => i,
                    None => {
                        self.entries.push(Entry {
                            attribution: merged,
                            sums: Counters::default(),
                            interval_ns: 0,
                            switches: 0,
                        });
                        self.entries.len() - 1
                    }
                }
            }
        };
        let Some(e) = self.entries.get_mut(index) else {
            return;
        };
        let keep = ATTR_EXACT & e.attribution.attr_flags & attribution.attr_flags;
        let or = (e.attribution.attr_flags | attribution.attr_flags) & !ATTR_EXACT;
        if e.attribution.attr_flags & ATTR_MERGED == 0 {
            e.attribution.guest_switch_count = attribution.guest_switch_count;
            e.attribution.attr_flags = or | keep;
        }
        e.sums.add(&sums);
        e.interval_ns = e.interval_ns.saturating_add(interval_ns);
        e.switches = e.switches.saturating_add(switches);
    }

    /// Takes the entries charged since the last drain, in first-charged order.
    pub fn drain(&mut self) -> Vec<Entry> {
        let mut out = Vec::new();
        self.drain_into(&mut out);
        out
    }

    /// [`Self::drain`] into `out` (cleared first), which gives the ledger its capacity in
    /// exchange: a caller that drains on every tick into the same buffer allocates nothing.
    pub fn drain_into(&mut self, out: &mut Vec<Entry>) {
        out.clear();
        std::mem::swap(&mut self.entries, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(pid: u32, switch_count: u64) -> Attribution {
        Attribution {
            task_id: pid,
            pid,
            attr_flags: ATTR_SLOT_VALID,
            guest_switch_count: switch_count,
            slot_flags: 0,
        }
    }

    fn at(faults: u64) -> Counters {
        Counters {
            min_flt: faults,
            pf_taken: faults,
            cpu_ns: faults * 10,
            ..Default::default()
        }
    }

    #[test]
    fn announced_switches_charge_each_task_its_own_faults() {
        let mut l = Ledger::default();
        l.start(at(0), 0);
        // Boot: no task named yet (zeroed slot), closed by the first announcement.
        l.close(at(3), 1, slot(0, 0), true, false);
        // Task 1 runs (switch 1), announced at its end; task 2 (switch 2), a tick in the middle.
        l.close(at(103), 2, slot(1, 1), true, false);
        l.close(at(153), 3, slot(2, 2), false, false);
        l.close(at(203), 4, slot(2, 2), true, false);
        let e = l.drain();
        let by_pid = |pid: u32| e.iter().find(|e| e.attribution.pid == pid).copied();
        let boot = by_pid(0).expect("boot interval kept apart");
        assert_eq!(boot.sums.min_flt, 3);
        let one = by_pid(1).expect("task 1");
        assert_eq!((one.sums.min_flt, one.switches), (100, 1));
        assert_ne!(one.attribution.attr_flags & ATTR_EXACT, 0);
        let two = by_pid(2).expect("task 2");
        assert_eq!(
            (two.sums.min_flt, two.sums.cpu_ns, two.switches),
            (100, 1000, 1)
        );
        assert_ne!(two.attribution.attr_flags & ATTR_EXACT, 0);
        assert_ne!(two.attribution.attr_flags & ATTR_AT_SWITCH, 0);
        assert!(l.drain().is_empty());
    }

    #[test]
    fn a_tick_between_an_announcement_and_its_switch_keeps_it_exact() {
        let mut l = Ledger::default();
        l.start(at(0), 0);
        l.close(at(1), 1, slot(0, 0), true, false);
        // Task 1 announced its end; a tick comes before task 2 names itself.
        l.close(at(10), 1, slot(1, 1), true, false);
        l.close(at(11), 2, slot(1, 1), false, false);
        // Task 2 switched in (count 2) and ran until its own announcement.
        l.close(at(50), 3, slot(2, 2), true, false);
        let e = l.drain();
        assert!(
            e.iter().all(|e| e.attribution.attr_flags & ATTR_EXACT != 0),
            "{e:?}"
        );
        // A second, unannounced switch in the next interval is not excused.
        l.close(at(60), 4, slot(3, 4), false, false);
        let e = l.drain();
        assert_eq!(e[0].attribution.attr_flags & ATTR_EXACT, 0, "{e:?}");
    }

    #[test]
    fn unannounced_switches_are_flagged_approximate() {
        let mut l = Ledger::default();
        l.start(at(0), 0);
        // Two switches the guest never announced, seen only at the tick.
        l.close(at(50), 1, slot(7, 2), false, false);
        let e = l.drain();
        assert_eq!(e.len(), 1);
        let f = e[0].attribution.attr_flags;
        assert_eq!(f & ATTR_EXACT, 0);
        assert_ne!(f & ATTR_SWITCHED, 0);
        // The next tick without a switch is exact again.
        l.close(at(60), 2, slot(7, 2), false, true);
        let e = l.drain();
        assert_ne!(e[0].attribution.attr_flags & ATTR_EXACT, 0);
        // Stopped: nothing opens or closes any more.
        assert!(!l.is_open());
        l.start(at(70), 3);
        l.close(at(80), 4, slot(7, 2), false, false);
        assert!(l.drain().is_empty());
    }

    #[test]
    fn too_many_tasks_in_one_tick_are_merged_not_lost() {
        let mut l = Ledger::default();
        l.start(at(0), 0);
        let n = MAX_ENTRIES as u64 + 10;
        for i in 0..n {
            l.close(
                at(i + 1),
                i + 1,
                slot(u32::try_from(i).expect("fits") + 1, i + 1),
                true,
                false,
            );
        }
        let e = l.drain();
        assert_eq!(e.len(), MAX_ENTRIES);
        let total: u64 = e.iter().map(|e| e.sums.min_flt).sum();
        assert_eq!(total, n);
        let merged = e.last().expect("merged");
        assert_eq!(
            (merged.attribution.pid, merged.attribution.attr_flags),
            (0, ATTR_MERGED)
        );
        assert_eq!(merged.sums.min_flt, n - (MAX_ENTRIES as u64 - 1));
    }
}
