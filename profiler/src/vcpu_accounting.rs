//! Per-vCPU accounting for the VMM's run loop.
//!
//! Owns [`VcpuAccounting`], which lives on one vCPU thread and builds that vCPU's picture: where
//! wall time went (inside `KVM_RUN` vs in the VMM between exits), how many exits of each kind the
//! VMM handled, and, over the whole run, the thread's host faults and CPU time and the vCPU's KVM
//! stats. [`VcpuAccounting::finish`] turns it into a serialisable [`VcpuReport`].
//!
//! Usage on the vCPU thread:
//!
//! ```no_run
//! # use mirrorball_profiler::{ExitKind, StatsFd, VcpuAccounting};
//! # fn run(vcpu: &mut kvm_ioctls::VcpuFd) -> Result<(), mirrorball_profiler::Error> {
//! let mut acct = VcpuAccounting::new(0, StatsFd::for_vcpu(vcpu).ok())?;
//! loop {
//!     acct.enter_run();
//!     let result = vcpu.run();
//!     let kind = match &result {
//!         Ok(exit) => ExitKind::from_exit(exit),
//!         Err(e) => ExitKind::from_run_error(e),
//!     };
//!     acct.exit_run(kind);
//!     // ... handle the exit ...
//!     if kind == ExitKind::Hlt { break; }
//! }
//! let report = acct.finish();
//! # let _ = report; Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Error, ExitCounters, ExitKind, StatsFd, StatsSample, ThreadUsage};

/// The running picture of one vCPU. Create it on the vCPU thread.
#[derive(Debug)]
pub struct VcpuAccounting {
    index: usize,
    thread: ThreadId,
    stats: Option<StatsFd>,
    stats_baseline: Option<StatsSample>,
    usage_baseline: ThreadUsage,
    exits: ExitCounters,
    kvm_run_ns: u64,
    vmm_ns: u64,
    /// Start of the interval not yet attributed to either side.
    mark: Instant,
    /// Whether that interval is inside `KVM_RUN`.
    in_run: bool,
    /// Host `CLOCK_MONOTONIC` (ns) of the first `KVM_RUN`: when the vCPU started running.
    first_run_ns: Option<u64>,
}

impl VcpuAccounting {
    /// Starts accounting for vCPU `index`. Must run on the vCPU thread: it snapshots this
    /// thread's usage and (if `stats` is given) the vCPU's KVM stats as the baseline.
    pub fn new(index: usize, stats: Option<StatsFd>) -> Result<Self, Error> {
        let stats_baseline = stats.as_ref().map(StatsFd::read).transpose()?;
        let usage_baseline = ThreadUsage::current()?;
        Ok(VcpuAccounting {
            index,
            thread: thread::current().id(),
            stats,
            stats_baseline,
            usage_baseline,
            exits: ExitCounters::new(),
            kvm_run_ns: 0,
            vmm_ns: 0,
            mark: Instant::now(),
            in_run: false,
            first_run_ns: None,
        })
    }

    /// Call just before `KVM_RUN`: the time since the last exit is VMM time.
    #[inline]
    pub fn enter_run(&mut self) {
        if self.first_run_ns.is_none() {
            self.first_run_ns = Some(crate::thread_usage::monotonic_ns());
        }
        self.attribute(Instant::now());
        self.in_run = true;
    }

    /// Call right after `KVM_RUN` returns: the time since [`enter_run`](Self::enter_run) is
    /// `KVM_RUN` time, and one exit of `kind` is counted.
    #[inline]
    pub fn exit_run(&mut self, kind: ExitKind) {
        self.attribute(Instant::now());
        self.in_run = false;
        self.exits.record(kind);
    }

    /// Charges `mark..now` to the side the vCPU was on. Every instant since creation is charged
    /// exactly once, so `kvm_run_ns + vmm_ns` is the wall time up to the last call.
    #[inline]
    fn attribute(&mut self, now: Instant) {
        let ns = nanos(now.saturating_duration_since(self.mark));
        if self.in_run {
            self.kvm_run_ns = self.kvm_run_ns.saturating_add(ns);
        } else {
            self.vmm_ns = self.vmm_ns.saturating_add(ns);
        }
        self.mark = now;
    }

    /// The vCPU index given at creation.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Exits counted so far.
    pub fn exits(&self) -> &ExitCounters {
        &self.exits
    }

    /// Nanoseconds spent inside `KVM_RUN` so far (up to the last enter/exit).
    pub fn kvm_run_ns(&self) -> u64 {
        self.kvm_run_ns
    }

    /// Nanoseconds spent in the VMM between exits so far (up to the last enter/exit).
    pub fn vmm_ns(&self) -> u64 {
        self.vmm_ns
    }

    /// The vCPU's stats fd, for sampling during the run (e.g. with [`StatsFd::read_into`]).
    pub fn stats(&self) -> Option<&StatsFd> {
        self.stats.as_ref()
    }

    /// Builds the report of everything since creation. Must be called on the vCPU thread
    /// (thread usage is per thread). May be called more than once; each report covers the whole
    /// run so far.
    ///
    /// Never fails as a whole, so exit counts and timings are not lost: if a final snapshot
    /// cannot be taken (stats read error, or the call comes from another thread), the affected
    /// fields stay empty/zero and the reason is listed in [`VcpuReport::errors`].
    pub fn finish(&mut self) -> VcpuReport {
        self.attribute(Instant::now());
        let mut errors = Vec::new();

        let usage = if thread::current().id() != self.thread {
            errors.push("finish() called off the vCPU thread: thread usage not reported".into());
            ThreadUsage::default()
        } else {
            match ThreadUsage::current() {
                Ok(now) => now.saturating_sub(&self.usage_baseline),
                Err(e) => {
                    errors.push(e.to_string());
                    ThreadUsage::default()
                }
            }
        };

        let kvm_stats = match (&self.stats, &self.stats_baseline) {
            (Some(fd), Some(base)) => match fd.read() {
                Ok(now) => now.delta_since(base),
                Err(e) => {
                    errors.push(format!("KVM stats: {e}"));
                    BTreeMap::new()
                }
            },
            _ => BTreeMap::new(),
        };

        VcpuReport {
            index: self.index,
            total_exits: self.exits.total(),
            exits: self.exits.clone(),
            kvm_run_ns: self.kvm_run_ns,
            vmm_ns: self.vmm_ns,
            host_minor_faults: usage.minor_faults,
            host_major_faults: usage.major_faults,
            user_ns: nanos(usage.user),
            system_ns: nanos(usage.system),
            voluntary_switches: usage.voluntary_switches,
            involuntary_switches: usage.involuntary_switches,
            kvm_stats,
            errors,
            stopped_at: None,
            first_run_monotonic_ns: self.first_run_ns,
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One vCPU's totals over a run (from [`VcpuAccounting::new`] to [`VcpuAccounting::finish`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: usize,
    /// Exits by kind, as counted by the VMM.
    pub exits: ExitCounters,
    /// Sum of `exits`.
    pub total_exits: u64,
    /// Wall time inside `KVM_RUN`.
    pub kvm_run_ns: u64,
    /// Wall time outside `KVM_RUN` (handling exits, and setup before the first run).
    pub vmm_ns: u64,
    /// Minor faults charged to the vCPU thread (includes guest touches of unpopulated memory).
    pub host_minor_faults: u64,
    /// Major faults charged to the vCPU thread.
    pub host_major_faults: u64,
    /// User CPU time of the vCPU thread.
    pub user_ns: u64,
    /// System CPU time of the vCPU thread (includes in-kernel emulation and fault handling).
    pub system_ns: u64,
    /// Voluntary context switches of the vCPU thread.
    pub voluntary_switches: u64,
    /// Involuntary context switches of the vCPU thread.
    pub involuntary_switches: u64,
    /// The vCPU's scalar KVM stats: deltas over the run for cumulative stats, current values
    /// for instant, peak and unknown-type stats; histograms left out. Empty without a stats fd.
    pub kvm_stats: BTreeMap<String, u64>,
    /// Snapshots that failed in `finish`; their fields above are zero/empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// Where the vCPU was when it stopped (filled by the VMM; absent when it could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<StoppedAt>,
    /// Host `CLOCK_MONOTONIC` (ns, comparable across processes) when the vCPU thread first
    /// entered `KVM_RUN`, i.e. when the vCPU started running; absent if it never did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_run_monotonic_ns: Option<u64>,
}

/// A vCPU's state when its thread stopped: says where a guest that hung (a timeout) was stuck.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoppedAt {
    /// Guest RIP.
    pub rip: u64,
    /// Guest RFLAGS.
    pub rflags: u64,
    /// `KVM_GET_MP_STATE` (0 runnable, 1 uninitialized, 2 init received, 3 halted, …).
    pub mp_state: u32,
}

impl std::fmt::Display for StoppedAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.mp_state {
            0 => "running",
            1 => "waiting for INIT/SIPI",
            2 => "INIT received",
            3 => "halted",
            4 => "SIPI received",
            _ => "other",
        };
        let interrupts = if self.rflags & (1 << 9) != 0 {
            "on"
        } else {
            "off"
        };
        write!(f, "rip {:#x}, {state}, interrupts {interrupts}", self.rip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn splits_time_between_kvm_run_and_vmm() {
        let created = Instant::now();
        let mut acct = VcpuAccounting::new(3, None).unwrap();
        for _ in 0..3 {
            acct.enter_run();
            spin(Duration::from_millis(10)); // "in KVM_RUN"
            acct.exit_run(ExitKind::IoOut);
            spin(Duration::from_millis(2)); // "in the VMM"
        }
        acct.enter_run();
        acct.exit_run(ExitKind::Hlt);
        let report = acct.finish();
        let wall = nanos(created.elapsed());

        assert_eq!(report.index, 3);
        assert_eq!(report.exits.get(ExitKind::IoOut), 3);
        assert_eq!(report.exits.get(ExitKind::Hlt), 1);
        assert_eq!(report.total_exits, 4);
        assert!(report.kvm_run_ns >= 30_000_000, "{report:?}");
        assert!(report.vmm_ns >= 6_000_000, "{report:?}");
        assert!(
            report.kvm_run_ns + report.vmm_ns <= wall,
            "{report:?} wall {wall}"
        );
        assert!(
            report.user_ns + report.system_ns >= 10_000_000,
            "{report:?}"
        );
        assert!(report.kvm_stats.is_empty());
        assert!(report.errors.is_empty());
    }

    #[test]
    fn exit_without_enter_still_counts_and_charges_vmm() {
        let mut acct = VcpuAccounting::new(0, None).unwrap();
        spin(Duration::from_millis(2));
        acct.exit_run(ExitKind::Other);
        assert_eq!(acct.exits().get(ExitKind::Other), 1);
        assert_eq!(acct.kvm_run_ns(), 0);
        assert!(acct.vmm_ns() >= 2_000_000);
    }

    #[test]
    fn finish_off_thread_reports_an_error_not_garbage() {
        let mut acct = VcpuAccounting::new(1, None).unwrap();
        acct.enter_run();
        acct.exit_run(ExitKind::IoIn);
        let report = thread::spawn(move || acct.finish()).join().unwrap();
        assert_eq!(report.exits.get(ExitKind::IoIn), 1);
        assert_eq!(report.errors.len(), 1, "{report:?}");
        assert_eq!((report.user_ns, report.host_minor_faults), (0, 0));
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["errors"][0].as_str().unwrap().contains("vCPU thread"));
    }

    #[test]
    fn report_serialises_expected_fields() {
        let mut acct = VcpuAccounting::new(2, None).unwrap();
        acct.enter_run();
        acct.exit_run(ExitKind::MmioWrite);
        let json = serde_json::to_value(acct.finish()).unwrap();
        for key in [
            "index",
            "exits",
            "total_exits",
            "kvm_run_ns",
            "vmm_ns",
            "host_minor_faults",
            "host_major_faults",
            "user_ns",
            "system_ns",
            "kvm_stats",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        assert_eq!(json["exits"]["mmio_write"], 1);
        assert!(json.get("errors").is_none(), "empty errors are omitted");
    }
}
