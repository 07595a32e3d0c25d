//! The host sampler: one thread per VM that, every period, takes per vCPU the deltas of KVM's
//! binary stats (`pf_taken`, `pf_fixed`, `exits`), of the vCPU thread's host faults and CPU
//! time, attributes them to the guest task the vCPU's slot in the guest region names at that
//! moment, and appends one record per vCPU to the host region's ring.
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mirrorball_devices::ProfilerControl;
use mirrorball_profiler::kvm_stats::StatsFd;
use mirrorball_profiler_abi::{
    validate_guest_region, Attribution, HostRegion, HostSample, ReadError,
};

use super::regions::ProfilerRegions;

/// Shortest period the sampler accepts (10 kHz).
pub const MIN_PERIOD: Duration = Duration::from_micros(100);

/// What the sampler needs of one vCPU.
pub struct SampledVcpu {
    /// The vCPU's binary stats, if KVM provides them.
    pub stats: Option<StatsFd>,
    /// The vCPU thread's id, set by the thread when it starts (0 until then).
    pub tid: Arc<AtomicI32>,
    /// The thread's counters when it started, published by [`SampledVcpu::start_hook`].
    pub baseline: Arc<Mutex<Option<ThreadCounters>>>,
    /// The thread's counters after its last KVM_RUN, published by [`SampledVcpu::stop_hook`]:
    /// once the thread has exited its stat file is gone, and the faults of its last interval
    /// would be lost without them.
    pub last: Arc<Mutex<Option<ThreadCounters>>>,
}

impl SampledVcpu {
    /// For a vCPU whose thread will publish its id in `tid`.
    pub fn new(stats: Option<StatsFd>, tid: Arc<AtomicI32>) -> Self {
        Self {
            stats,
            tid,
            baseline: Arc::new(Mutex::new(None)),
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// A hook for the vCPU thread to run after its last KVM_RUN: it records the thread's
    /// counters, so the sampler still charges the last interval after the thread has exited.
    pub fn stop_hook(&self) -> Box<dyn FnOnce() + Send> {
        publish_own_counters(self.last.clone())
    }

    /// A hook for the vCPU thread to run before its first KVM_RUN: it records the thread's
    /// counters, so the sampler charges every later fault even if its first tick comes late.
    pub fn start_hook(&self) -> Box<dyn FnOnce() + Send> {
        publish_own_counters(self.baseline.clone())
    }
}

/// A hook that reads the calling thread's counters into `slot`.
fn publish_own_counters(slot: Arc<Mutex<Option<ThreadCounters>>>) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let counters = read_thread(tid, tick_ns());
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = counters;
    })
}

/// Nanoseconds per clock tick of /proc's CPU times.
fn tick_ns() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
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

/// Parses the fields we use out of a `/proc/<pid>/task/<tid>/stat` line.
pub fn parse_task_stat(line: &str, tick_ns: u64) -> Option<ThreadCounters> {
    // The command name is in parentheses and may contain anything, even ") ".
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")" comes field 3 (state); minflt is field 10, majflt 12, utime 14, stime 15.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ThreadCounters {
        min_flt: field(10)?,
        maj_flt: field(12)?,
        utime_ns: field(14)?.saturating_mul(tick_ns),
        stime_ns: field(15)?.saturating_mul(tick_ns),
    })
}

fn read_thread(tid: i32, tick_ns: u64) -> Option<ThreadCounters> {
    ThreadStat::open(tid)?.read(tick_ns)
}

/// `/proc/self/task/<tid>/stat` kept open: every read is one `pread` from offset 0 (procfs
/// regenerates the text), instead of an open, a read and a close per tick.
struct ThreadStat {
    tid: i32,
    file: std::fs::File,
}

impl ThreadStat {
    fn open(tid: i32) -> Option<Self> {
        if tid <= 0 {
            return None;
        }
        let file = std::fs::File::open(format!("/proc/self/task/{tid}/stat")).ok()?;
        Some(Self { tid, file })
    }

    fn read(&self, tick_ns: u64) -> Option<ThreadCounters> {
        use std::os::unix::fs::FileExt;
        // A stat line is about 300 bytes; the command name is at most 64.
        let mut buf = [0u8; 1024];
        let n = self.file.read_at(&mut buf, 0).ok()?;
        parse_task_stat(std::str::from_utf8(buf.get(..n)?).ok()?, tick_ns)
    }
}

/// The counters of thread `tid`, through `cache` (reopened when the thread id changes).
fn read_thread_cached(
    cache: &mut Option<ThreadStat>,
    tid: i32,
    tick_ns: u64,
) -> Option<ThreadCounters> {
    if cache.as_ref().map(|c| c.tid) != Some(tid) {
        *cache = ThreadStat::open(tid);
    }
    cache.as_ref()?.read(tick_ns)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Per-vCPU state between ticks.
struct VcpuState {
    vcpu: SampledVcpu,
    indexes: [Option<usize>; 3],
    stats_buf: Vec<u64>,
    last_stats: [u64; 3],
    /// `None` until the thread's counters were read once (its id may not be known yet).
    last_thread: Option<ThreadCounters>,
    /// The thread's stat file, once its id is known.
    thread_stat: Option<ThreadStat>,
    last_switch_count: Option<u64>,
    last_ns: u64,
}

/// What the sampler did, reported when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SamplerReport {
    /// Ticks taken.
    pub ticks: u64,
    /// Records written to the host ring.
    pub records: u64,
    /// Ticks that started more than a period late (the schedule skipped ahead).
    pub late_ticks: u64,
    /// Host-ring records lost (overwritten) before the end-of-run attribution read them.
    pub lost_records: u64,
}

/// A running sampler thread.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<SamplerReport>,
}

impl Sampler {
    /// Starts sampling `vcpus` of the VM whose regions are `regions`, every `period` — or, with
    /// a profiler device, every period the guest's driver asked for (`control`).
    pub fn spawn(
        regions: Arc<ProfilerRegions>,
        vcpus: Vec<SampledVcpu>,
        period: Duration,
        control: Option<Arc<ProfilerControl>>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let period = period.max(MIN_PERIOD);
        let handle = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || run(&regions, vcpus, period, control.as_deref(), &flag))?;
        Ok(Self { stop, handle })
    }

    /// Stops the thread (after one last tick) and returns its report.
    pub fn stop(self) -> SamplerReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

fn run(
    regions: &ProfilerRegions,
    vcpus: Vec<SampledVcpu>,
    default_period: Duration,
    control: Option<&ProfilerControl>,
    stop: &AtomicBool,
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
        .map(|vcpu| {
            let indexes = ["pf_taken", "pf_fixed", "exits"]
                .map(|name| vcpu.stats.as_ref().and_then(|s| s.index_of(name)));
            VcpuState {
                vcpu,
                indexes,
                stats_buf: Vec::new(),
                last_stats: [0; 3],
                last_thread: None,
                thread_stat: None,
                last_switch_count: None,
                last_ns: monotonic_ns(),
            }
        })
        .collect();
    for s in &mut states {
        s.last_stats = read_stats(s);
    }
    let mut next = Instant::now() + period_now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let now = Instant::now();
        if !stopping && now < next {
            std::thread::sleep(next - now);
        }
        let period = period_now();
        next += period;
        if Instant::now() > next {
            report.late_ticks += 1;
            next = Instant::now() + period;
        }
        report.ticks += 1;
        // The guest may rewrite its region's header at any time: validate it on every tick.
        let guest_view = regions
            .guest
            .region()
            .ok()
            .and_then(|r| validate_guest_region(r).ok());
        for (index, s) in states.iter_mut().enumerate() {
            let now_ns = monotonic_ns();
            let stats = read_stats(s);
            let tid = s.vcpu.tid.load(Ordering::Acquire);
            // A thread that has exited cannot be read: its published last counters stand in.
            let thread = read_thread_cached(&mut s.thread_stat, tid, tick_ns)
                .or_else(|| *s.vcpu.last.lock().unwrap_or_else(|p| p.into_inner()))
                .or(s.last_thread);
            // Before the first reading, the thread's own start-up counters are the baseline
            // (or, without them, this reading: nothing before it is charged).
            let base = s
                .last_thread
                .or_else(|| *s.vcpu.baseline.lock().unwrap_or_else(|p| p.into_inner()))
                .or(thread)
                .unwrap_or_default();
            let thread = thread.unwrap_or_default();
            let slot = match &guest_view {
                Some(view) => view.vcpu(index as u32),
                None => Err(ReadError::OutOfRange),
            };
            let attribution = Attribution::from_slot(slot, s.last_switch_count);
            let mut sample = HostSample {
                timestamp_ns: now_ns,
                vcpu: index as u32,
                interval_ns: now_ns.saturating_sub(s.last_ns),
                pf_taken: stats[0].saturating_sub(s.last_stats[0]),
                pf_fixed: stats[1].saturating_sub(s.last_stats[1]),
                exits: stats[2].saturating_sub(s.last_stats[2]),
                host_min_flt: thread.min_flt.saturating_sub(base.min_flt),
                host_maj_flt: thread.maj_flt.saturating_sub(base.maj_flt),
                vcpu_utime_ns: thread.utime_ns.saturating_sub(base.utime_ns),
                vcpu_stime_ns: thread.stime_ns.saturating_sub(base.stime_ns),
                ..Default::default()
            };
            sample.set_attribution(&attribution);
            ring.push(&sample);
            report.records += 1;
            if attribution.attr_flags & mirrorball_profiler_abi::ATTR_SLOT_VALID != 0 {
                s.last_switch_count = Some(attribution.guest_switch_count);
            }
            s.last_stats = stats;
            if thread != ThreadCounters::default() {
                s.last_thread = Some(thread);
            }
            s.last_ns = now_ns;
        }
        if stopping {
            return report;
        }
    }
}

fn read_stats(s: &mut VcpuState) -> [u64; 3] {
    let Some(stats) = &s.vcpu.stats else {
        return [0; 3];
    };
    if stats.read_into(&mut s.stats_buf).is_err() {
        return s.last_stats;
    }
    s.indexes.map(|i| {
        i.and_then(|i| stats.descriptors().get(i))
            .and_then(|d| d.first(&s.stats_buf))
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_stat_fields_survive_odd_command_names() {
        let line = "1234 (vcpu 0) x) R 1 2 3 4 5 6 77 8 99 10 300 400 0 0 20 0 1 0 100 0 0";
        let c = parse_task_stat(line, 10_000_000).expect("parse");
        assert_eq!((c.min_flt, c.maj_flt), (77, 99));
        assert_eq!((c.utime_ns, c.stime_ns), (3_000_000_000, 4_000_000_000));
        assert_eq!(parse_task_stat("garbage", 1), None);
        assert_eq!(parse_task_stat("1 (x) R 1 2", 1), None);
    }

    #[test]
    fn own_thread_faults_are_read_from_proc() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // The sampler's way: one file kept open and read again each tick.
        let mut cache = None;
        let before = read_thread_cached(&mut cache, tid, 10_000_000).expect("own thread");
        let pages = 64;
        // SAFETY: a private anonymous mapping, touched once per page and unmapped below.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                pages * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            for i in 0..pages {
                std::ptr::write_volatile(p.cast::<u8>().add(i * 4096), 1);
            }
            libc::munmap(p, pages * 4096);
        }
        let after = read_thread_cached(&mut cache, tid, 10_000_000).expect("own thread");
        assert!(
            after.min_flt >= before.min_flt + pages as u64,
            "{before:?} -> {after:?}"
        );
        // A fresh open agrees with the kept one.
        let fresh = read_thread(tid, 10_000_000).expect("own thread");
        assert!(fresh.min_flt >= after.min_flt, "{after:?} vs {fresh:?}");
        assert_eq!(
            read_thread_cached(&mut cache, 0, 1),
            None,
            "no thread id yet"
        );
        assert!(cache.is_none());
    }
}
