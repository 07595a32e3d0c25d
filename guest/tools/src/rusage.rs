//! The calling process's own resource usage (`getrusage(RUSAGE_SELF)`): fault counts and CPU time,
//! the figures the `work` program reports about itself.

use std::io;
use std::time::Duration;

/// Faults and CPU time of this process so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Minor page faults (`ru_minflt`).
    pub min_flt: u64,
    /// Major page faults (`ru_majflt`).
    pub maj_flt: u64,
    /// User CPU time.
    pub utime: Duration,
    /// System CPU time.
    pub stime: Duration,
}

impl Usage {
    /// What happened between `earlier` and `self` (saturating: counters never go backwards).
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            min_flt: self.min_flt.saturating_sub(earlier.min_flt),
            maj_flt: self.maj_flt.saturating_sub(earlier.maj_flt),
            utime: self.utime.saturating_sub(earlier.utime),
            stime: self.stime.saturating_sub(earlier.stime),
        }
    }
}

fn duration(tv: libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u32::try_from(tv.tv_usec).unwrap_or(0).min(999_999);
    Duration::new(secs, micros * 1000)
}

/// The current usage of this process (all its threads).
pub fn self_usage() -> io::Result<Usage> {
    // SAFETY: `rusage` is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage` that outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Usage {
        min_flt: u64::try_from(ru.ru_minflt).unwrap_or(0),
        maj_flt: u64::try_from(ru.ru_majflt).unwrap_or(0),
        utime: duration(ru.ru_utime),
        stime: duration(ru.ru_stime),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_fresh_memory_counts_minor_faults() {
        let before = self_usage().unwrap();
        let mut v = vec![0u8; 64 << 12];
        for page in v.chunks_mut(4096) {
            // SAFETY: `page` is a live `&mut [u8]` of 4096 bytes.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 1) };
        }
        let after = self_usage().unwrap();
        // Other test threads also fault; at least our 64 pages are counted (unless the
        // allocator reused resident memory, which a fresh 256 KiB allocation is not).
        assert!(after.since(&before).min_flt >= 1);
        assert_eq!(before.since(&after).min_flt, 0);
    }
}
