//! The host sampler: one thread per VM that, every period, closes each vCPU's open interval
//! (the deltas of KVM's binary stats `pf_taken`, `pf_fixed`, `exits`, and of the vCPU thread's
//! host faults and CPU time), charges it to the guest task the vCPU's slot names, and appends
//! the vCPU's attributed intervals (see `ledger`) to the host region's ring. In exact mode the
//! vCPU threads also close intervals themselves, at every task switch the guest announces
//! ([`TaskSwitches`]), reading their own counters there.
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mirrorball_devices::{ProfilerControl, TaskSwitchSink};
use mirrorball_profiler::kvm_stats::StatsFd;
use mirrorball_profiler_abi::{
    validate_guest_region, Attribution, GuestRegionView, HostRegion, HostSample, ReadError,
    TASK_NONE,
};

use super::cow_charges::CowCharges;
use super::ledger::{Counters, Entry, Ledger};
use super::regions::ProfilerRegions;
use crate::vstate::vcpu_thread::VcpuThread;

/// The vCPU's KVM binary stats the sampler reads: the first three are charged to tasks; with
/// them, the last two tell whether KVM may have touched guest memory on the vCPU thread's
/// behalf (page faults, instructions it emulated, hypercalls), which can take host faults.
const KVM_STATS: [&str; 5] = [
    "pf_taken",
    "pf_fixed",
    "exits",
    "insn_emulation",
    "hypercalls",
];

/// Shortest period the sampler accepts (10 kHz).
pub const MIN_PERIOD: Duration = Duration::from_micros(100);

/// How per-task host figures are attributed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttributionMode {
    /// Intervals close at every task switch the guest announces, and at ticks.
    #[default]
    Exact,
    /// Intervals close at ticks only: each goes to the task running at its end.
    Sampled,
}

impl AttributionMode {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Sampled => "sampled",
        }
    }
}

impl std::str::FromStr for AttributionMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exact" => Ok(Self::Exact),
            "sampled" => Ok(Self::Sampled),
            other => Err(format!(
                "unknown attribution {other:?} (expected exact or sampled)"
            )),
        }
    }
}

/// Faults of a thread (by id) that the kernel does not count for it: (minor, major) resolved
/// by the VMM's own pager (`crate::budget::uffd`), added to the thread's host faults.
pub type ThreadFaultSource = Arc<dyn Fn(i32) -> (u64, u64) + Send + Sync>;

/// One vCPU as both its own thread (at announced switches) and the sampler (at ticks) see it.
pub struct VcpuProbe {
    index: u32,
    stats: Option<StatsFd>,
    indexes: [Option<usize>; KVM_STATS.len()],
    /// The data words of `stats` that hold those (one `pread` reads just these).
    kvm_words: Option<Range<usize>>,
    /// The vCPU thread's id (0 until it starts) and run epoch.
    thread: Arc<VcpuThread>,
    regions: Arc<ProfilerRegions>,
    state: Mutex<ProbeState>,
    announced: AtomicU64,
    /// Faults the VMM's pager resolved for the vCPU thread, if it pages guest memory.
    pager_faults: std::sync::OnceLock<ThreadFaultSource>,
}

/// What the probe's lock guards: the ledger, and a buffer for KVM stats reads.
struct ProbeState {
    ledger: Ledger,
    stats_buf: Vec<u64>,
    last_kvm: [u64; KVM_STATS.len()],
    /// The kernel's (minor, major) fault counts of the vCPU thread at the latest read, by
    /// either thread: what a tick that skips the stat line charges up to.
    last_faults: (u64, u64),
    /// The vCPU thread's `schedstat`, kept open, and the last wait read.
    schedstat: Option<ThreadProcFile>,
    last_wait_ns: u64,
}

impl VcpuProbe {
    fn lock(&self) -> MutexGuard<'_, ProbeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// KVM's [`KVM_STATS`] now (the last values read if the read fails).
    fn read_kvm(&self, st: &mut ProbeState) -> [u64; KVM_STATS.len()] {
        self.read_kvm_fresh(st).unwrap_or(st.last_kvm)
    }

    /// KVM's [`KVM_STATS`] now; `None` without stats or if the read fails.
    fn read_kvm_fresh(&self, st: &mut ProbeState) -> Option<[u64; KVM_STATS.len()]> {
        let stats = self.stats.as_ref()?;
        let words = self.kvm_words.clone()?;
        stats.read_words_into(words, &mut st.stats_buf).ok()?;
        let values = self.indexes.map(|i| {
            i.and_then(|i| stats.descriptors().get(i))
                .and_then(|d| d.first(&st.stats_buf))
                .unwrap_or(0)
        });
        st.last_kvm = values;
        Some(values)
    }

    /// The run-queue wait of thread `tid` so far, ns (`/proc/self/task/<tid>/schedstat`, second
    /// field); the last value read if the read fails.
    fn read_wait(st: &mut ProbeState, tid: i32) -> u64 {
        let wait = ThreadProcFile::cached(&mut st.schedstat, tid, "schedstat")
            .and_then(|f| f.read_with(&mut [0u8; 96], parse_schedstat_wait));
        if let Some(w) = wait {
            st.last_wait_ns = w;
        }
        st.last_wait_ns
    }

    /// The vCPU's counters, read on the vCPU thread itself.
    fn own_counters(&self, st: &mut ProbeState) -> Counters {
        let kvm = self.read_kvm(st);
        let (min_flt, maj_flt) = own_faults();
        st.last_faults = (min_flt, maj_flt);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let (min_flt, maj_flt) = self.with_pager_faults(tid, min_flt, maj_flt);
        let wait_ns = Self::read_wait(st, tid);
        Counters {
            min_flt,
            maj_flt,
            cpu_ns: clock_ns(libc::CLOCK_THREAD_CPUTIME_ID),
            pf_taken: kvm[0],
            pf_fixed: kvm[1],
            exits: kvm[2],
            wait_ns,
        }
    }

    /// The kernel's fault counts of thread `tid` plus those the VMM's pager resolved for it.
    fn with_pager_faults(&self, tid: i32, min_flt: u64, maj_flt: u64) -> (u64, u64) {
        match self.pager_faults.get() {
            Some(source) => {
                let (min, maj) = source(tid);
                (min_flt.saturating_add(min), maj_flt.saturating_add(maj))
            }
            None => (min_flt, maj_flt),
        }
    }

    /// The attribution the vCPU's slot gives now.
    fn slot(&self) -> Attribution {
        let slot = match self
            .regions
            .guest
            .region()
            .ok()
            .and_then(|r| validate_guest_region(r).ok())
        {
            Some(view) => view.vcpu(self.index),
            None => Err(ReadError::OutOfRange),
        };
        Attribution::from_slot(slot, None)
    }

    /// On the vCPU thread: the guest announced a task switch; close the interval.
    pub fn announce_switch(&self) {
        let mut st = self.lock();
        if !st.ledger.is_open() {
            return;
        }
        let now = self.own_counters(&mut st);
        let slot = self.slot();
        st.ledger.close(now, monotonic_ns(), slot, true, false);
        self.announced.fetch_add(1, Ordering::Relaxed);
    }

    /// Switches announced so far.
    pub fn announced(&self) -> u64 {
        self.announced.load(Ordering::Relaxed)
    }
}

/// What the sampler needs of one vCPU.
pub struct SampledVcpu {
    probe: Arc<VcpuProbe>,
}

impl SampledVcpu {
    /// vCPU `index` of the VM whose regions are `regions`, with its KVM stats (if KVM provides
    /// them) and where its thread will publish its id.
    pub fn new(
        index: usize,
        stats: Option<StatsFd>,
        thread: Arc<VcpuThread>,
        regions: Arc<ProfilerRegions>,
    ) -> Self {
        let indexes = KVM_STATS.map(|name| stats.as_ref().and_then(|s| s.index_of(name)));
        let kvm_words = stats.as_ref().and_then(|s| {
            let ranges = indexes
                .iter()
                .flatten()
                .filter_map(|&i| s.descriptors().get(i).map(|d| d.word_range()));
            ranges.reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))
        });
        Self {
            probe: Arc::new(VcpuProbe {
                // vCPU indexes are below `mptable::MAX_CPUS`.
                #[allow(clippy::cast_possible_truncation)]
                index: index as u32,
                stats,
                indexes,
                kvm_words,
                thread,
                regions,
                state: Mutex::new(ProbeState {
                    ledger: Ledger::default(),
                    stats_buf: Vec::new(),
                    last_kvm: [0; KVM_STATS.len()],
                    last_faults: (0, 0),
                    schedstat: None,
                    last_wait_ns: 0,
                }),
                announced: AtomicU64::new(0),
                pager_faults: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Adds the faults `source` resolved for the vCPU thread to its host faults (set before
    /// the vCPU runs; a second call is ignored).
    pub fn add_fault_source(&self, source: ThreadFaultSource) {
        let _ = self.probe.pager_faults.set(source);
    }

    /// The probe the vCPU thread reports announced switches to.
    pub fn probe(&self) -> Arc<VcpuProbe> {
        self.probe.clone()
    }

    /// A hook for the vCPU thread to run before its first KVM_RUN: opens its first interval
    /// with the thread's own counters, so every later fault is charged.
    pub fn start_hook(&self) -> Box<dyn FnOnce() + Send> {
        let probe = self.probe.clone();
        Box::new(move || {
            let mut st = probe.lock();
            let now = probe.own_counters(&mut st);
            st.ledger.start(now, monotonic_ns());
        })
    }

    /// A hook for the vCPU thread to run after its last KVM_RUN: closes its last interval with
    /// the thread's own counters (once the thread has exited nobody can read them).
    pub fn stop_hook(&self) -> Box<dyn FnOnce() + Send> {
        let probe = self.probe.clone();
        Box::new(move || {
            let mut st = probe.lock();
            let now = probe.own_counters(&mut st);
            let slot = probe.slot();
            st.ledger.close(now, monotonic_ns(), slot, false, true);
        })
    }
}

/// Where announced task switches go: the probes of one VM's vCPUs, by index. Guest-driven: an
/// index out of range is ignored.
pub struct TaskSwitches {
    probes: Vec<Arc<VcpuProbe>>,
    /// Exact attribution on (the default); off, announcements are ignored.
    enabled: std::sync::atomic::AtomicBool,
}

impl TaskSwitches {
    /// The switch sink for `vcpus`.
    pub fn new(vcpus: &[SampledVcpu]) -> Self {
        Self {
            probes: vcpus.iter().map(SampledVcpu::probe).collect(),
            enabled: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Turns exact attribution on or off (before the guest runs).
    pub fn set_mode(&self, mode: AttributionMode) {
        self.enabled
            .store(mode == AttributionMode::Exact, Ordering::Release);
    }

    /// Switches announced per vCPU so far.
    pub fn announced(&self) -> Vec<u64> {
        self.probes.iter().map(|p| p.announced()).collect()
    }
}

impl TaskSwitchSink for TaskSwitches {
    fn task_switch(&self, vcpu: usize) {
        if !self.wanted() {
            return;
        }
        if let Some(p) = self.probes.get(vcpu) {
            p.announce_switch();
        }
    }

    fn wanted(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }
}

/// The calling thread's minor and major faults (`getrusage(RUSAGE_THREAD)`).
fn own_faults() -> (u64, u64) {
    // SAFETY: `rusage` is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage` for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return (0, 0);
    }
    (
        u64::try_from(ru.ru_minflt).unwrap_or(0),
        u64::try_from(ru.ru_majflt).unwrap_or(0),
    )
}

/// `clock_gettime(clock)` in ns (0 if the clock cannot be read).
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; an invalid clock only makes the call fail.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// The CPU-time clock of thread `tid` of this process (Linux's encoding of a per-thread
/// scheduler clock: `~tid << 3 | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED`).
fn thread_cpu_clock(tid: i32) -> libc::clockid_t {
    ((!tid) << 3) | 0b110
}

/// Nanoseconds per clock tick of /proc's CPU times.
fn tick_ns() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_s =
        u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1)).unwrap_or(1);
    1_000_000_000 / ticks_per_s
}

/// Counters of the vCPU thread read from `/proc/self/task/<tid>/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounters {
    /// Minor faults.
    pub min_flt: u64,
    /// Major faults.
    pub maj_flt: u64,
    /// User time, ns (clock-tick resolution).
    pub utime_ns: u64,
    /// System time, ns (clock-tick resolution).
    pub stime_ns: u64,
}

/// The run-queue wait (second field, ns) of a `schedstat` line: `cpu_ns wait_ns timeslices`.
pub fn parse_schedstat_wait(line: &str) -> Option<u64> {
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Parses the fields we use out of a `/proc/<pid>/task/<tid>/stat` line.
pub fn parse_task_stat(line: &str, tick_ns: u64) -> Option<ThreadCounters> {
    // The command name is in parentheses and may contain anything, even ") ".
    let rest = line.get(line.rfind(')')? + 1..)?;
    // After ")" comes field 3 (state); minflt is field 10, majflt 12, utime 14, stime 15. One
    // pass, no allocation: this runs per vCPU on every sampler tick.
    let mut fields = rest.split_ascii_whitespace();
    let mut next_after = |skip: usize| fields.nth(skip)?.parse::<u64>().ok();
    let min_flt = next_after(7)?; // fields 3..=9 skipped
    let maj_flt = next_after(1)?; // field 11 skipped
    let utime = next_after(1)?; // field 13 skipped
    let stime = next_after(0)?;
    Some(ThreadCounters {
        min_flt,
        maj_flt,
        utime_ns: utime.saturating_mul(tick_ns),
        stime_ns: stime.saturating_mul(tick_ns),
    })
}

#[cfg(test)]
fn read_thread(tid: i32, tick_ns: u64) -> Option<ThreadCounters> {
    read_thread_cached(&mut None, tid, tick_ns)
}

/// A file of `/proc/self/task/<tid>/` kept open: every read is one `pread` from offset 0
/// (procfs regenerates the text), instead of an open, a read and a close per tick.
struct ThreadProcFile {
    tid: i32,
    file: std::fs::File,
}

impl ThreadProcFile {
    /// The file `name` of thread `tid` through `cache`, reopened when the thread id changes
    /// (and dropped while there is no thread id yet).
    fn cached<'a>(cache: &'a mut Option<Self>, tid: i32, name: &str) -> Option<&'a Self> {
        if tid <= 0 {
            *cache = None;
            return None;
        }
        if cache.as_ref().map(|c| c.tid) != Some(tid) {
            *cache = std::fs::File::open(format!("/proc/self/task/{tid}/{name}"))
                .ok()
                .map(|file| Self { tid, file });
        }
        cache.as_ref()
    }

    /// Reads the file into `buf` and parses what it read as text.
    fn read_with<T>(&self, buf: &mut [u8], parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, 0).ok()?;
        parse(std::str::from_utf8(buf.get(..n)?).ok()?)
    }
}

/// The counters of thread `tid`, through `cache` (reopened when the thread id changes).
fn read_thread_cached(
    cache: &mut Option<ThreadProcFile>,
    tid: i32,
    tick_ns: u64,
) -> Option<ThreadCounters> {
    // A stat line is about 300 bytes; the command name is at most 64.
    ThreadProcFile::cached(cache, tid, "stat")?
        .read_with(&mut [0u8; 1024], |line| parse_task_stat(line, tick_ns))
}

pub(crate) fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// The sampler's own state per vCPU.
struct VcpuState {
    vcpu: SampledVcpu,
    /// The thread's stat file, once its id is known (faults and the user/system split).
    thread_stat: Option<ThreadProcFile>,
    /// The last user and system times read from it, to split CPU time between them.
    last_split: Option<(u64, u64)>,
    /// Share of user time in the vCPU thread's CPU time, in 1/65536.
    user_share: u64,
    /// The ledger's entries of this tick (kept to reuse its allocation).
    drained: Vec<crate::profiling::ledger::Entry>,
    /// What the last tick saw of the thread's activity: its run epoch and the KVM stats that
    /// count work that may take host faults (not `exits`: an interrupt or a halt takes none).
    last_activity: Option<[u64; 5]>,
    /// Whether the last tick saw activity (then this one reads the stat line whatever it sees:
    /// a fault that exit began may have completed after that tick's read).
    active_last_tick: bool,
    /// When the stat line and the schedstat wait were last read (monotonic ns).
    last_stat_read_ns: u64,
    last_wait_read_ns: u64,
    /// The wall and CPU clocks at the last tick, to tell whether the thread could have waited.
    last_clocks: Option<(u64, u64)>,
}

/// The longest a tick that sees no activity may go on with the last stat line or schedstat
/// wait (faults or wait that slipped past the checks are charged at most this late, to the
/// same task in exact mode: an announced switch reads the thread's own counters).
const REREAD_AFTER_NS: u64 = 10_000_000;

/// A thread whose CPU time grew by at least the wall time minus this since the last tick ran
/// all the while: any run-queue wait it had is below this, and is read at a later tick.
const WAIT_SLACK_NS: u64 = 50_000;

/// What one tick read of a vCPU thread (the sampler's report counts these).
#[derive(Clone, Copy)]
struct Reads {
    stat: bool,
    wait: bool,
}

impl VcpuState {
    /// The vCPU's counters read from the sampler thread, and which files it read; `None` if
    /// its thread is not known.
    ///
    /// The thread's fault counts come from its `/proc` stat line, the costliest read by far.
    /// A thread that stayed inside one `KVM_RUN` (same odd run epoch) without a KVM page fault,
    /// an emulated instruction or a hypercall since the last tick ran guest code and KVM's
    /// handling of exits that touch no guest memory (interrupts, halts), which take no host
    /// fault: such a tick charges the last counts read. Its run-queue wait is read only if its
    /// CPU time fell short of the wall time. Either is read again at least every
    /// [`REREAD_AFTER_NS`].
    fn external_counters(
        &mut self,
        st: &mut ProbeState,
        tick_ns: u64,
    ) -> Option<(Counters, Reads)> {
        let probe = self.vcpu.probe.clone();
        let tid = probe.thread.tid();
        if tid <= 0 {
            return None;
        }
        let epoch = probe.thread.epoch();
        let kvm = probe.read_kvm_fresh(st);
        let wall_ns = monotonic_ns();
        let cpu_ns = clock_ns(thread_cpu_clock(tid));
        let activity = kvm.map(|k| [epoch, k[0], k[1], k[3], k[4]]);
        let active =
            epoch.is_multiple_of(2) || activity.is_none() || activity != self.last_activity;
        let mut reads = Reads {
            stat: active
                || self.active_last_tick
                || wall_ns.saturating_sub(self.last_stat_read_ns) >= REREAD_AFTER_NS,
            wait: false,
        };
        self.last_activity = activity;
        self.active_last_tick = active;
        let (min_flt, maj_flt) = if reads.stat {
            let faults = self.read_stat(st, tid, tick_ns)?;
            self.last_stat_read_ns = wall_ns;
            faults
        } else {
            st.last_faults
        };
        let ran_throughout = self.last_clocks.is_some_and(|(wall0, cpu0)| {
            cpu_ns.saturating_sub(cpu0).saturating_add(WAIT_SLACK_NS)
                >= wall_ns.saturating_sub(wall0)
        });
        self.last_clocks = Some((wall_ns, cpu_ns));
        reads.wait =
            !ran_throughout || wall_ns.saturating_sub(self.last_wait_read_ns) >= REREAD_AFTER_NS;
        let wait_ns = if reads.wait {
            self.last_wait_read_ns = wall_ns;
            VcpuProbe::read_wait(st, tid)
        } else {
            st.last_wait_ns
        };
        let kvm = kvm.unwrap_or(st.last_kvm);
        let (min_flt, maj_flt) = probe.with_pager_faults(tid, min_flt, maj_flt);
        let counters = Counters {
            min_flt,
            maj_flt,
            cpu_ns,
            pf_taken: kvm[0],
            pf_fixed: kvm[1],
            exits: kvm[2],
            wait_ns,
        };
        Some((counters, reads))
    }

    /// Reads the thread's stat line: its fault counts (kept in `st` as the latest), and its
    /// user/system split.
    fn read_stat(&mut self, st: &mut ProbeState, tid: i32, tick_ns: u64) -> Option<(u64, u64)> {
        let thread = read_thread_cached(&mut self.thread_stat, tid, tick_ns)?;
        if let Some((u, s)) = self.last_split {
            let (du, ds) = (
                thread.utime_ns.saturating_sub(u),
                thread.stime_ns.saturating_sub(s),
            );
            if let Some(share) = du.saturating_mul(65_536).checked_div(du + ds) {
                self.user_share = share;
            }
        }
        self.last_split = Some((thread.utime_ns, thread.stime_ns));
        // Never below what the thread itself read at a switch since (the counts only grow).
        st.last_faults = (
            thread.min_flt.max(st.last_faults.0),
            thread.maj_flt.max(st.last_faults.1),
        );
        Some(st.last_faults)
    }

    /// The record of one ledger entry.
    fn record(&self, e: &Entry, now_ns: u64) -> HostSample {
        let user = u64::try_from((u128::from(e.sums.cpu_ns) * u128::from(self.user_share)) >> 16)
            .unwrap_or(u64::MAX);
        let mut sample = HostSample {
            timestamp_ns: now_ns,
            vcpu: self.vcpu.probe.index,
            interval_ns: e.interval_ns,
            pf_taken: e.sums.pf_taken,
            pf_fixed: e.sums.pf_fixed,
            exits: e.sums.exits,
            host_min_flt: e.sums.min_flt,
            host_maj_flt: e.sums.maj_flt,
            vcpu_utime_ns: user,
            vcpu_stime_ns: e.sums.cpu_ns.saturating_sub(user),
            vcpu_wait_ns: e.sums.wait_ns,
            switches: e.switches,
            ..Default::default()
        };
        sample.set_attribution(&e.attribution);
        sample
    }
}

/// What the sampler did, reported when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SamplerReport {
    /// Ticks taken.
    pub ticks: u64,
    /// Records written to the host ring.
    pub records: u64,
    /// Ticks that started more than a period late (the schedule skipped ahead).
    pub late_ticks: u64,
    /// Host-ring records lost (overwritten) before the end-of-run attribution read them.
    pub lost_records: u64,
    /// How per-task figures were attributed.
    pub attribution: AttributionMode,
    /// Task switches the guest announced, per vCPU (each closed an interval).
    pub announced_switches: Vec<u64>,
    /// CPU time the sampler thread spent in its ticks (reading counters, writing records), ns.
    pub busy_ns: u64,
    /// The part of `busy_ns` spent on the vCPUs one by one (reading a vCPU's counters, closing
    /// its interval, writing its records; with the guest region's header check); the rest is
    /// the tick's own (copy-on-write records).
    pub vcpu_busy_ns: u64,
    /// vCPU intervals the ticks closed (one per vCPU and tick once its thread runs).
    pub vcpu_reads: u64,
    /// Of those, the ones that read the thread's stat line (its host faults); the others saw
    /// the thread inside one KVM_RUN, with no KVM page fault, emulation or hypercall, since
    /// the tick before.
    pub stat_reads: u64,
    /// Of the `vcpu_reads`, the ones that read the thread's schedstat (its run-queue wait); the
    /// others saw it run throughout the interval.
    pub wait_reads: u64,
    /// Ticks that read at least one vCPU thread's stat line.
    pub stat_ticks: u64,
    /// The part of `vcpu_busy_ns` spent in those ticks, ns.
    pub stat_tick_busy_ns: u64,
}

impl SamplerReport {
    /// The sampler's own cost per tick and vCPU, ns: what each vCPU adds to a tick.
    pub fn tick_cost_ns_per_vcpu(&self) -> f64 {
        let vcpus = self.announced_switches.len().max(1) as f64;
        self.vcpu_busy_ns as f64 / self.ticks.max(1) as f64 / vcpus
    }

    /// The sampler's cost per tick and vCPU on ticks that read a stat line (a vCPU may have
    /// faulted), and on the others, ns (with the guest region's header check).
    pub fn tick_cost_ns_by_kind(&self) -> (f64, f64) {
        let vcpus = self.announced_switches.len().max(1) as f64;
        let light_ticks = self.ticks.saturating_sub(self.stat_ticks);
        let light_ns = self.vcpu_busy_ns.saturating_sub(self.stat_tick_busy_ns);
        (
            self.stat_tick_busy_ns as f64 / self.stat_ticks.max(1) as f64 / vcpus,
            light_ns as f64 / light_ticks.max(1) as f64 / vcpus,
        )
    }

    /// The sampler's own cost per tick that does not depend on the vCPUs, ns.
    pub fn tick_cost_ns_fixed(&self) -> f64 {
        self.busy_ns.saturating_sub(self.vcpu_busy_ns) as f64 / self.ticks.max(1) as f64
    }
}

/// The stop request: a flag and a condition variable the sampler waits on between ticks.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopSignal {
    /// Waits until `deadline` or a stop request; returns whether stop was requested.
    fn wait_until(&self, deadline: Instant) -> bool {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *stopped {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = self
                .wake
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn request(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }

    fn requested(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Puts the calling (sampler) thread in `SCHED_BATCH`: its wake-ups never preempt a running
/// thread, so a tick runs on a free CPU at once, or, when every CPU is busy, at the scheduler's
/// next decision (a tick more than a period late is counted in `late_ticks`), instead of
/// throwing a vCPU out of guest mode at every tick. On PVM each such preemption cost the vCPU
/// thread far more CPU time than the tick itself: at 1 kHz the VMM's CPU time on a fault-heavy
/// run was 1.13-1.15x that without host tracking, 1.00-1.04x in `SCHED_BATCH` (bench group 9).
/// A host that refuses the policy leaves the thread as it was.
fn yield_to_vcpus() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler with pid 0 changes the calling thread's policy only; `param`
    // is a valid sched_param that outlives the call.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

/// A running sampler thread.
pub struct Sampler {
    stop: Arc<StopSignal>,
    handle: JoinHandle<SamplerReport>,
}

impl Sampler {
    /// Starts sampling `vcpus` of the VM whose regions are `regions`, every `period` — or, with
    /// a profiler device, every period the guest's driver asked for (`control`). `mode` is
    /// reported; announced switches reach the vCPUs' probes directly.
    pub fn spawn(
        regions: Arc<ProfilerRegions>,
        vcpus: Vec<SampledVcpu>,
        period: Duration,
        control: Option<Arc<ProfilerControl>>,
        mode: AttributionMode,
        cow: Arc<CowCharges>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(StopSignal::default());
        let flag = stop.clone();
        let period = period.max(MIN_PERIOD);
        let handle = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                yield_to_vcpus();
                let mut report = run(&regions, vcpus, period, control.as_deref(), &cow, &flag);
                report.attribution = mode;
                report
            })?;
        Ok(Self { stop, handle })
    }

    /// Stops the thread at once (it takes one last tick) and returns its report.
    pub fn stop(self) -> SamplerReport {
        self.stop.request();
        self.handle.join().unwrap_or_default()
    }
}

fn run(
    regions: &ProfilerRegions,
    vcpus: Vec<SampledVcpu>,
    default_period: Duration,
    control: Option<&ProfilerControl>,
    cow: &CowCharges,
    stop: &StopSignal,
) -> SamplerReport {
    let period_now = || {
        control
            .map(|c| Duration::from_nanos(c.effective_period_ns()))
            .filter(|p| !p.is_zero())
            .unwrap_or(default_period)
            .max(MIN_PERIOD)
    };
    let mut report = SamplerReport::default();
    let tick_ns = tick_ns();
    let Ok(host_mut) = regions.host.region_mut() else {
        return report;
    };
    let Ok(host) = HostRegion::attach(host_mut) else {
        return report;
    };
    let Ok(mut ring) = host.ring_writer() else {
        return report;
    };
    let mut states: Vec<VcpuState> = vcpus
        .into_iter()
        .map(|vcpu| VcpuState {
            vcpu,
            thread_stat: None,
            last_split: None,
            user_share: 1 << 16,
            drained: Vec::new(),
            last_activity: None,
            active_last_tick: false,
            last_stat_read_ns: 0,
            last_wait_read_ns: 0,
            last_clocks: None,
        })
        .collect();
    // Task-table index of each range owner's thread id seen in a record (names the owners of CoW
    // breaks); at most one entry per owned range.
    let mut task_of_pid: Vec<(u32, u32)> = Vec::new();
    let mut next = Instant::now() + period_now();
    loop {
        let stopping = stop.wait_until(next) || stop.requested();
        let period = period_now();
        next += period;
        if Instant::now() > next {
            report.late_ticks += 1;
            next = Instant::now() + period;
        }
        report.ticks += 1;
        let tick_start = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
        let mut stat_tick = false;
        // The guest may rewrite its region's header at any time: validate it on every tick.
        let guest_view = regions
            .guest
            .region()
            .ok()
            .and_then(|r| validate_guest_region(r).ok());
        for s in &mut states {
            let probe = s.vcpu.probe.clone();
            let mut st = probe.lock();
            if st.ledger.is_open() {
                if let Some((now, reads)) = s.external_counters(&mut st, tick_ns) {
                    let slot = slot_of(guest_view.as_ref(), probe.index);
                    st.ledger.close(now, monotonic_ns(), slot, false, false);
                    report.vcpu_reads += 1;
                    report.stat_reads += u64::from(reads.stat);
                    report.wait_reads += u64::from(reads.wait);
                    stat_tick |= reads.stat;
                }
            }
            st.ledger.drain_into(&mut s.drained);
            drop(st);
            let now_ns = monotonic_ns();
            for e in &s.drained {
                let a = &e.attribution;
                // Only owners of accounted ranges: the pids are the guest's claims, and a guest
                // naming a new one at every switch must not grow this list.
                if a.task_id != TASK_NONE
                    && cow.owns(a.pid)
                    && !task_of_pid.contains(&(a.pid, a.task_id))
                {
                    task_of_pid.retain(|&(pid, _)| pid != a.pid);
                    task_of_pid.push((a.pid, a.task_id));
                }
                ring.push(&s.record(e, now_ns));
                report.records += 1;
            }
        }
        let vcpus_end = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
        report.vcpu_busy_ns += vcpus_end.saturating_sub(tick_start);
        if stat_tick {
            report.stat_ticks += 1;
            report.stat_tick_busy_ns += vcpus_end.saturating_sub(tick_start);
        }
        let task_of = |pid| {
            task_of_pid
                .iter()
                .find(|&&(p, _)| p == pid)
                .map(|&(_, t)| t)
        };
        for record in cow.take_records(monotonic_ns(), stopping, task_of) {
            ring.push(&record);
            report.records += 1;
        }
        report.busy_ns += clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(tick_start);
        if stopping {
            report.announced_switches = states.iter().map(|s| s.vcpu.probe.announced()).collect();
            return report;
        }
    }
}

fn slot_of(view: Option<&GuestRegionView<'_>>, index: u32) -> Attribution {
    let slot = match view {
        Some(view) => view.vcpu(index),
        None => Err(ReadError::OutOfRange),
    };
    Attribution::from_slot(slot, None)
}

#[cfg(test)]
mod tests;
