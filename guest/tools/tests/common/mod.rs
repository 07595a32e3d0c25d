//! Helpers for the integration tests: scratch directories, guest regions built with the ABI
//! crate's writer in memory and saved as files, word pokes, and running the binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use mirrorball_profiler_abi::*;

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mb-guest-tools-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A formatted guest region in process memory.
pub struct TestRegion {
    pub mem: Vec<AtomicU64>,
    pub layout: GuestRegionLayout,
}

pub const PERIOD_NS: u64 = 50_000_000;

impl TestRegion {
    pub fn new(vcpus: u32, tasks: u32, ring: u32) -> Self {
        let layout = GuestRegionLayout::new(vcpus, tasks, ring).unwrap();
        let mem: Vec<AtomicU64> = (0..layout.size / 8).map(|_| AtomicU64::new(0)).collect();
        let init = RegionInit {
            generation: 7,
            sample_period_ns: PERIOD_NS,
            clock_id: CLOCK_MONOTONIC,
        };
        GuestRegion::format(RegionMut::from_atomic_words(&mem), &layout, &init).unwrap();
        Self { mem, layout }
    }

    pub fn writer(&self) -> GuestRegion<'_> {
        GuestRegion::attach(RegionMut::from_atomic_words(&self.mem)).unwrap()
    }

    pub fn region(&self) -> Region<'_> {
        Region::from_atomic_words(&self.mem)
    }

    /// Registers `pid` as `comm`; returns its task id.
    pub fn register(&self, pid: u32, comm: &[u8]) -> u32 {
        self.writer()
            .task_table()
            .register(pid, pid, &comm_from(comm), 1)
            .unwrap()
    }

    /// Pushes `samples`; returns their sequence numbers.
    pub fn push(&self, samples: &[GuestSample]) -> Vec<u64> {
        let w = self.writer();
        let mut ring = w.ring_writer().unwrap();
        samples.iter().map(|s| ring.push(s)).collect()
    }

    /// Byte offset of the ring slot that holds sequence `seq`.
    pub fn slot_offset(&self, seq: u64) -> usize {
        let slots = &self.layout.ring.slots;
        slots.offset
            + usize::try_from(seq % u64::from(slots.capacity)).expect("fits") * slots.stride
    }

    /// Overwrites the 8-byte word at byte offset `at` (8-aligned).
    pub fn poke(&self, at: usize, value: u64) {
        self.mem[at / 8].store(value, Ordering::Relaxed);
    }

    /// The region's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.mem
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect()
    }

    /// Saves the region as a file.
    pub fn save(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}

/// A sample of task `task_id`/`pid` whose counters are derived from `n`.
pub fn sample(task_id: u32, pid: u32, n: u64) -> GuestSample {
    GuestSample {
        timestamp_ns: 1_000_000_000 + n * PERIOD_NS,
        task_id,
        pid,
        min_flt: 100 * n,
        maj_flt: n / 2,
        utime_ns: 10_000_000 * n,
        stime_ns: 1_000_000 * n,
        cpu: 0,
        flags: 0,
    }
}

/// The CSV row the monitor prints for `s` with sequence `seq`.
pub fn csv_row(s: &GuestSample, seq: u64) -> String {
    format!(
        "{},{},{},{},{},{},{},{}",
        s.timestamp_ns, s.task_id, s.pid, s.min_flt, s.maj_flt, s.utime_ns, s.stime_ns, seq
    )
}

/// Runs a binary of this package with `args` and `envs`.
pub fn run(bin: &str, args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("MIRRORBALL_PROC_DIR");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that `o` failed with exit status `code` and exactly one line on stderr, containing
/// `needle`, and no panic.
pub fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
}
