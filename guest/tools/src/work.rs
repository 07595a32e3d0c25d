//! The `work` program (MP3's page-fault workload): its command line, its run, its summary.
//!
//! `work <MiB> <R|L> <accesses> [iterations] [--register] [--proc DIR] [--sleep-ms N] [--seed N]`
//! maps `MiB` of memory, then per iteration performs `accesses` single-byte read-modify-writes,
//! uniformly random (`R`) or mostly next to the previous one (`L`: +1 or + <300 bytes), and
//! sleeps `--sleep-ms` (default 1000, as MP3's `sleep(1)`) between iterations. With
//! `--register` it registers its own pid with the driver first and unregisters at the end (also
//! after Ctrl-C). It prints its pid when it starts and one `key=value` summary line at the end,
//! with its own faults and CPU time from `getrusage`.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mirrorball_workload::{AccessStream, Pattern, DEFAULT_ITERATIONS};

use crate::args::{self, Cursor, UsageError};
use crate::procfs::{self, Command, ProcError};
use crate::rusage::{self, Usage};
use crate::signal;
use crate::workmem::WorkMemory;

/// Usage text.
pub const USAGE: &str = "usage: work <MiB> <R|L> <accesses> [iterations] \
[--register] [--proc DIR] [--sleep-ms N] [--seed N]";
/// Largest memory size, MiB.
pub const MAX_MIB: u64 = 65_536;

/// A parsed `work` command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkArgs {
    /// Memory to map, MiB.
    pub mib: u64,
    /// Access pattern.
    pub pattern: Pattern,
    /// Accesses per iteration.
    pub accesses: u64,
    /// Iterations.
    pub iterations: u64,
    /// Register with the driver for the run.
    pub register: bool,
    /// The driver's procfs directory (`--proc`), else the default/environment.
    pub proc_dir: Option<PathBuf>,
    /// Pause between iterations.
    pub sleep: Duration,
    /// Seed of the access stream (default: from the pid and the clock).
    pub seed: Option<u64>,
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Run.
    Run(WorkArgs),
    /// Print [`USAGE`].
    Help,
}

fn pattern(text: &str) -> Result<Pattern, UsageError> {
    match text {
        "R" | "r" => Ok(Pattern::Random),
        "L" | "l" => Ok(Pattern::Locality),
        _ => Err(UsageError::bad("pattern", text, "must be R or L")),
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: Vec<String>) -> Result<Parsed, UsageError> {
    let mut cur = Cursor::new(args);
    let mut positional = Vec::new();
    let mut register = false;
    let mut proc_dir = None;
    let mut sleep = Duration::from_secs(1);
    let mut seed = None;
    while let Some(arg) = cur.next_arg() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--register" => register = true,
            "--proc" => proc_dir = Some(PathBuf::from(cur.value(&arg)?)),
            "--sleep-ms" => {
                let ms = args::parse_u64("sleep", &cur.value(&arg)?, 0, 3_600_000)?;
                sleep = Duration::from_millis(ms);
            }
            "--seed" => seed = Some(args::parse_u64("seed", &cur.value(&arg)?, 0, u64::MAX)?),
            a if args::is_option(a) => return Err(UsageError::UnknownOption(arg)),
            _ => positional.push(arg),
        }
    }
    let (mib, pat, acc, iters) = match positional.as_slice() {
        [m, p, a] => (m, p, a, None),
        [m, p, a, i] => (m, p, a, Some(i)),
        _ => {
            return Err(UsageError::Arity(format!(
                "expected 3 or 4 arguments, got {}; {USAGE}",
                positional.len()
            )))
        }
    };
    let mib = args::parse_u64("memory size (MiB)", mib, 1, MAX_MIB)?;
    let pattern = pattern(pat)?;
    let accesses = args::parse_u64("access count", acc, 1, u64::MAX)?;
    let iterations = match iters {
        Some(text) => args::parse_u64("iteration count", text, 1, u64::from(u32::MAX))?,
        None => u64::from(DEFAULT_ITERATIONS),
    };
    Ok(Parsed::Run(WorkArgs {
        mib,
        pattern,
        accesses,
        iterations,
        register,
        proc_dir,
        sleep,
        seed,
    }))
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    /// The memory could not be mapped.
    #[error("cannot map {mib} MiB: {error}")]
    Map {
        /// Size asked for.
        mib: u64,
        /// What failed.
        error: io::Error,
    },
    /// Registration with the driver failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// `getrusage` or `mincore` failed.
    #[error("{what}: {error}")]
    Sys {
        /// The call.
        what: &'static str,
        /// What failed.
        error: io::Error,
    },
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(io::Error),
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// This process's id.
    pub pid: u32,
    /// Iterations completed (fewer than asked after Ctrl-C).
    pub iterations_done: u64,
    /// Whole-process usage at the end.
    pub total: Usage,
    /// Usage during the access loop only (from just before the first iteration).
    pub work_loop: Usage,
    /// Pages of the work memory resident at the end (touched by the accesses).
    pub pages_touched: usize,
    /// Pages of the work memory.
    pub pages: usize,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Checksum of the bytes read (keeps the accesses from being optimised away).
    pub checksum: u64,
}

impl Report {
    /// The one-line summary (`key=value` fields after the pid).
    pub fn summary(&self) -> String {
        format!(
            "work: pid {} done: iterations={} min_flt={} maj_flt={} utime_ms={} stime_ms={} \
             loop_min_flt={} loop_maj_flt={} pages_touched={}/{} elapsed_s={:.3}",
            self.pid,
            self.iterations_done,
            self.total.min_flt,
            self.total.maj_flt,
            self.total.utime.as_millis(),
            self.total.stime.as_millis(),
            self.work_loop.min_flt,
            self.work_loop.maj_flt,
            self.pages_touched,
            self.pages,
            self.elapsed.as_secs_f64(),
        )
    }
}

/// Registers a pid for its lifetime; unregisters on drop (errors are reported on stderr).
struct Registration {
    status: PathBuf,
    pid: u32,
}

impl Registration {
    fn new(status: PathBuf, pid: u32) -> Result<Self, ProcError> {
        procfs::send(&status, Command::Register, pid)?;
        Ok(Self { status, pid })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = procfs::send(&self.status, Command::Unregister, self.pid) {
            eprintln!("work: warning: {e}");
        }
    }
}

fn default_seed(pid: u32) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    nanos ^ (u64::from(pid) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

fn usage(what: &'static str) -> Result<Usage, WorkError> {
    rusage::self_usage().map_err(|error| WorkError::Sys { what, error })
}

/// Runs `work`: prints the start line to `out`, runs the iterations (stopping early when `stop()`
/// becomes true), and returns the report (the caller prints [`Report::summary`]).
pub fn run(
    a: &WorkArgs,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<Report, WorkError> {
    let start = Instant::now();
    let pid = std::process::id();
    let seed = a.seed.unwrap_or_else(|| default_seed(pid));
    let letter = match a.pattern {
        Pattern::Random => 'R',
        Pattern::Locality => 'L',
    };
    writeln!(
        out,
        "work: pid {pid}: {} MiB {letter}, {} accesses x {} iterations, seed {seed}",
        a.mib, a.accesses, a.iterations
    )
    .and_then(|()| out.flush())
    .map_err(WorkError::Output)?;

    // Register first, as MP3's work does, so the profiler sees the allocation's faults too.
    let _registration = if a.register {
        let dir = procfs::proc_dir(a.proc_dir.as_deref());
        Some(Registration::new(procfs::status_path(&dir), pid)?)
    } else {
        None
    };

    let len = a.mib << 20;
    let mut memory = usize::try_from(len)
        .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))
        .and_then(WorkMemory::new)
        .map_err(|error| WorkError::Map { mib: a.mib, error })?;
    let mut stream = AccessStream::new(a.pattern, len, seed);
    let before = usage("getrusage")?;
    let mut checksum = 0u64;
    let mut done = 0;
    while done < a.iterations && !stop() {
        checksum = checksum.wrapping_add(memory.iterate(&mut stream, a.accesses));
        done += 1;
        if done < a.iterations && !signal::sleep_unless(a.sleep, stop) {
            break;
        }
    }
    let total = usage("getrusage")?;
    let pages_touched = memory.resident_pages().map_err(|error| WorkError::Sys {
        what: "mincore",
        error,
    })?;
    Ok(Report {
        pid,
        iterations_done: done,
        total,
        work_loop: total.since(&before),
        pages_touched,
        pages: memory.pages(),
        elapsed: start.elapsed(),
        checksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_the_mp3_command_line() {
        let Ok(Parsed::Run(a)) = parse(argv("64 R 100000 5 --seed 7 --sleep-ms 0")) else {
            panic!("should parse");
        };
        assert_eq!(
            (a.mib, a.pattern, a.accesses, a.iterations),
            (64, Pattern::Random, 100_000, 5)
        );
        assert_eq!(
            (a.seed, a.sleep, a.register),
            (Some(7), Duration::ZERO, false)
        );
        let Ok(Parsed::Run(a)) = parse(argv("--register 1 L 10")) else {
            panic!("should parse");
        };
        assert_eq!(a.iterations, u64::from(DEFAULT_ITERATIONS));
        assert!(a.register);
        assert_eq!(parse(argv("--help")), Ok(Parsed::Help));
    }

    #[test]
    fn rejects_bad_command_lines() {
        for bad in [
            "0 R 1 1",
            "x R 1 1",
            "1 Q 1 1",
            "1 R 0 1",
            "1 R 1 0",
            "1 R",
            "1 R 1 1 1",
            "1 R 1 --bogus",
        ] {
            assert!(parse(argv(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn tiny_run_faults_its_pages() {
        let a = WorkArgs {
            mib: 1,
            pattern: Pattern::Random,
            accesses: 100,
            iterations: 2,
            register: false,
            proc_dir: None,
            sleep: Duration::ZERO,
            seed: Some(5),
        };
        let mut out = Vec::new();
        let r = run(&a, &mut out, &|| false).unwrap();
        assert_eq!(r.iterations_done, 2);
        assert_eq!(r.pages, 256);
        assert!(r.pages_touched > 50);
        assert!(r.summary().contains("iterations=2"));
        assert!(String::from_utf8_lossy(&out).starts_with("work: pid "));
    }
}
