//! Resource usage of the calling thread and resident memory of the process.
//!
//! Owns [`ThreadUsage`] (`getrusage(RUSAGE_THREAD)`: host page faults, CPU time and context
//! switches charged to the calling thread, which for a vCPU thread includes faults taken while the
//! guest touches unpopulated memory inside `KVM_RUN`) and [`ProcessMemory`] (`VmRSS` and friends
//! from `/proc/self/status`, for measuring the VMM's memory overhead).
//!
//! Counters are absolute; take two snapshots and use [`ThreadUsage::saturating_sub`] for deltas.
//! [`monotonic_ns`] reads the host clock the accounting stamps events with.

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use serde::Serialize;

use crate::Error;

/// Host `CLOCK_MONOTONIC` in ns: one clock for every process on the host, so a time one
/// process records can be compared with another's.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Absolute `getrusage` counters of one thread (or the process, see [`ThreadUsage::process`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadUsage {
    /// Page faults served without I/O (`ru_minflt`).
    pub minor_faults: u64,
    /// Page faults that needed I/O (`ru_majflt`).
    pub major_faults: u64,
    /// User CPU time.
    pub user: Duration,
    /// System CPU time.
    pub system: Duration,
    /// Voluntary context switches (`ru_nvcsw`, e.g. blocking).
    pub voluntary_switches: u64,
    /// Involuntary context switches (`ru_nivcsw`, preemption).
    pub involuntary_switches: u64,
}

impl ThreadUsage {
    /// Usage of the calling thread (`RUSAGE_THREAD`).
    pub fn current() -> Result<Self, Error> {
        Self::get(libc::RUSAGE_THREAD)
    }

    /// Usage of the whole process (`RUSAGE_SELF`).
    pub fn process() -> Result<Self, Error> {
        Self::get(libc::RUSAGE_SELF)
    }

    fn get(who: libc::c_int) -> Result<Self, Error> {
        // SAFETY: `rusage` is plain old data; all-zero is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable `rusage` for the duration of the call.
        let ret = unsafe { libc::getrusage(who, &mut ru) };
        if ret != 0 {
            return Err(Error::io("getrusage", std::io::Error::last_os_error()));
        }
        Ok(Self::from_rusage(&ru))
    }

    fn from_rusage(ru: &libc::rusage) -> Self {
        let count = |v: libc::c_long| u64::try_from(v).unwrap_or(0);
        ThreadUsage {
            minor_faults: count(ru.ru_minflt),
            major_faults: count(ru.ru_majflt),
            user: timeval(&ru.ru_utime),
            system: timeval(&ru.ru_stime),
            voluntary_switches: count(ru.ru_nvcsw),
            involuntary_switches: count(ru.ru_nivcsw),
        }
    }

    /// `self - earlier`, field by field, saturating at zero.
    pub fn saturating_sub(&self, earlier: &ThreadUsage) -> ThreadUsage {
        ThreadUsage {
            minor_faults: self.minor_faults.saturating_sub(earlier.minor_faults),
            major_faults: self.major_faults.saturating_sub(earlier.major_faults),
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            voluntary_switches: self
                .voluntary_switches
                .saturating_sub(earlier.voluntary_switches),
            involuntary_switches: self
                .involuntary_switches
                .saturating_sub(earlier.involuntary_switches),
        }
    }

    /// Usage since `earlier` (alias of [`saturating_sub`](Self::saturating_sub)).
    pub fn delta(&self, earlier: &ThreadUsage) -> ThreadUsage {
        self.saturating_sub(earlier)
    }
}

/// A `timeval` as a `Duration`; negative fields count as zero.
fn timeval(tv: &libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u64::try_from(tv.tv_usec).unwrap_or(0);
    Duration::from_secs(secs).saturating_add(Duration::from_micros(micros))
}

/// Resident memory of the process, from `/proc/self/status` (all in bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    /// `VmRSS`: resident set size.
    pub rss_bytes: u64,
    /// `VmHWM`: peak resident set size.
    pub peak_rss_bytes: Option<u64>,
    /// `RssAnon`: resident anonymous memory (guest RAM lives here).
    pub anon_bytes: Option<u64>,
    /// `RssFile`: resident file mappings.
    pub file_bytes: Option<u64>,
    /// `RssShmem`: resident shared memory.
    pub shmem_bytes: Option<u64>,
}

/// `/proc/self/status` is a few KiB; refuse to read more than this.
const STATUS_LIMIT: u64 = 1 << 20;

impl ProcessMemory {
    /// Reads `/proc/self/status`.
    pub fn current() -> Result<Self, Error> {
        let file =
            File::open("/proc/self/status").map_err(|e| Error::io("open /proc/self/status", e))?;
        let mut text = String::new();
        file.take(STATUS_LIMIT)
            .read_to_string(&mut text)
            .map_err(|e| Error::io("read /proc/self/status", e))?;
        Self::parse_status(&text)
    }

    /// Parses the text of a `/proc/<pid>/status` file. `VmRSS` is required; the other fields
    /// are `None` when absent (e.g. kernel threads, old kernels).
    pub fn parse_status(text: &str) -> Result<Self, Error> {
        let mut out = ProcessMemory::default();
        let mut rss = None;
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let slot = match key {
                "VmRSS" => &mut rss,
                "VmHWM" => &mut out.peak_rss_bytes,
                "RssAnon" => &mut out.anon_bytes,
                "RssFile" => &mut out.file_bytes,
                "RssShmem" => &mut out.shmem_bytes,
                _ => continue,
            };
            *slot = Some(parse_kb(key, rest)?);
        }
        out.rss_bytes = rss.ok_or_else(|| Error::Proc {
            file: "/proc/self/status",
            reason: "no VmRSS line".into(),
        })?;
        Ok(out)
    }
}

/// Parses `"   1234 kB"` into bytes.
fn parse_kb(key: &str, rest: &str) -> Result<u64, Error> {
    let bad = |why: &str| Error::Proc {
        file: "/proc/self/status",
        reason: format!("{key}: {why} in {:?}", rest.trim()),
    };
    let mut parts = rest.split_whitespace();
    let kb: u64 = parts
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad("no number"))?;
    if parts.next() != Some("kB") || parts.next().is_some() {
        return Err(bad("unit is not kB"));
    }
    kb.checked_mul(1024).ok_or_else(|| bad("value overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Serialises the tests that allocate and measure memory, so one test's mapping or unmapping
    /// cannot disturb another's measurement.
    static MEMORY_TESTS: Mutex<()> = Mutex::new(());

    const PAGE: usize = 4096;

    /// A private anonymous mapping with THP disabled (so each 4 KiB page is its own fault).
    struct Anon {
        ptr: *mut u8,
        len: usize,
    }

    impl Anon {
        fn new(pages: usize) -> Anon {
            let len = pages * PAGE;
            // SAFETY: anonymous private mapping with no address hint; the result is checked.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            // SAFETY: `ptr..ptr+len` is the mapping just created. Failure only means THP stays on.
            unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
            Anon {
                ptr: ptr.cast(),
                len,
            }
        }

        fn touch_all(&self) {
            for off in (0..self.len).step_by(PAGE) {
                // SAFETY: `off < len`, inside the writable mapping owned by `self`.
                unsafe { self.ptr.add(off).write_volatile(1) };
            }
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping created in `new`, which nothing borrows anymore.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    #[test]
    fn touching_fresh_pages_raises_minor_faults() {
        let _guard = MEMORY_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        const N: usize = 300;
        let region = Anon::new(N);
        let before = ThreadUsage::current().unwrap();
        region.touch_all();
        let after = ThreadUsage::current().unwrap();
        let delta = after.saturating_sub(&before);
        assert!(
            delta.minor_faults >= N as u64,
            "{N} fresh pages gave only {} minor faults",
            delta.minor_faults
        );
        // Touching them again costs no faults.
        let again = ThreadUsage::current().unwrap();
        region.touch_all();
        let delta2 = ThreadUsage::current().unwrap().delta(&again);
        assert!(delta2.minor_faults < N as u64 / 2, "{delta2:?}");
    }

    #[test]
    fn thread_usage_is_per_thread() {
        let _guard = MEMORY_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        const N: usize = 300;
        let main_before = ThreadUsage::current().unwrap();
        let child = std::thread::spawn(|| {
            let before = ThreadUsage::current().unwrap();
            let region = Anon::new(N);
            region.touch_all();
            ThreadUsage::current().unwrap().delta(&before).minor_faults
        })
        .join()
        .unwrap();
        let main_delta = ThreadUsage::current().unwrap().delta(&main_before);
        assert!(child >= N as u64, "child thread saw {child}");
        assert!(main_delta.minor_faults < N as u64 / 2, "{main_delta:?}");
    }

    #[test]
    fn cpu_time_grows_with_work() {
        // Spin until this thread has been charged 30 ms of CPU (a loaded machine may take a
        // while to give it that much), with a generous wall-clock bound: broken accounting never
        // gets there.
        let before = ThreadUsage::current().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut d = ThreadUsage::current().unwrap().delta(&before);
        while d.user + d.system < Duration::from_millis(30)
            && start.elapsed() < Duration::from_secs(10)
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            d = ThreadUsage::current().unwrap().delta(&before);
        }
        assert!(d.user + d.system >= Duration::from_millis(30), "{d:?}");
    }

    #[test]
    fn saturating_sub_never_underflows() {
        let big = ThreadUsage {
            minor_faults: 10,
            major_faults: 2,
            user: Duration::from_millis(5),
            system: Duration::from_millis(7),
            voluntary_switches: 3,
            involuntary_switches: 4,
        };
        assert_eq!(
            ThreadUsage::default().saturating_sub(&big),
            ThreadUsage::default()
        );
        let d = big.saturating_sub(&ThreadUsage {
            minor_faults: 4,
            ..ThreadUsage::default()
        });
        assert_eq!(d.minor_faults, 6);
        assert_eq!(d.system, Duration::from_millis(7));
    }

    #[test]
    fn parses_status_text() {
        let text = "Name:\tvmm\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nRssAnon:\t  512 kB\n\
                    RssFile:\t     500 kB\nRssShmem:\t  12 kB\nThreads:\t3\n";
        let m = ProcessMemory::parse_status(text).unwrap();
        assert_eq!(
            m,
            ProcessMemory {
                rss_bytes: 1024 * 1024,
                peak_rss_bytes: Some(2048 * 1024),
                anon_bytes: Some(512 * 1024),
                file_bytes: Some(500 * 1024),
                shmem_bytes: Some(12 * 1024),
            }
        );
        let minimal = ProcessMemory::parse_status("VmRSS: 8 kB").unwrap();
        assert_eq!(minimal.rss_bytes, 8192);
        assert_eq!(minimal.anon_bytes, None);
    }

    #[test]
    fn rejects_malformed_status() {
        for bad in [
            "Name:\tx\n",
            "VmRSS:\n",
            "VmRSS:\t12 MB\n",
            "VmRSS:\tlots kB\n",
            "VmRSS:\t99999999999999999999 kB\n",
            "VmRSS:\t18446744073709551615 kB\n",
            "VmRSS:\t1 kB extra\n",
        ] {
            assert!(
                matches!(ProcessMemory::parse_status(bad), Err(Error::Proc { .. })),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn rss_follows_touched_memory() {
        let _guard = MEMORY_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        const N: usize = 4096; // 16 MiB
        let before = ProcessMemory::current().unwrap();
        assert!(before.rss_bytes > 0);
        let region = Anon::new(N);
        region.touch_all();
        let after = ProcessMemory::current().unwrap();
        let grown = after.rss_bytes.saturating_sub(before.rss_bytes);
        assert!(grown >= (N * PAGE) as u64 * 3 / 4, "RSS grew by {grown}");
        assert!(after.peak_rss_bytes.unwrap_or(0) >= after.rss_bytes);
    }
}
