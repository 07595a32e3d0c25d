//! Host fault tracking on vs off on a fault-heavy run.
//!
//! Host fault tracking is the profiler's host sampler: a thread that every period reads, per
//! vCPU, KVM's binary stats (`pf_taken`, `pf_fixed`, `exits`) and the vCPU thread's faults and
//! CPU time from `/proc`, and appends one record per vCPU to the host region. The VMM switches
//! it on and off together with the guest side (`--sample-hz 0`); here it is switched off alone:
//! the VM is built with the profiler (regions published, the guest region mapped, the guest
//! registering its task and appending samples) and the sampler is simply not started (the
//! bench takes `BuiltVm::profiling` out and keeps the regions alive). So the pair differs only
//! by host tracking. (The per-exit accounting of every vCPU — exit counters and time in
//! `KVM_RUN` — is always on and part of the exit round trip the `exits` group measures.)
//!
//! The workload faults on every page it touches: `work 256 R 1000000 1` first-touches all 65,536
//! pages of a fresh 256 MiB memfd in one iteration (each touch a host fault and a KVM MMU fault).
//! Two measures: runtime = the task's `Started` → `Finished` as the VMM saw it, and the CPU
//! time of the VMM's threads during the run (the sampler's own included; time spent waiting for
//! a CPU is not). Pairs of runs back to back, alternating which goes first; the ratio is the
//! median of the pairs' ratios, which cancels most of the load other processes put on the
//! machine, since both runs of a pair share it.
use std::time::Duration;

use anyhow::{Context, Result};
use vmm::builder::workload;
use vmm::workload::TaskSpec;

use super::profiler::run_to_end;
use super::report::{median, spread, Row, Target};

/// The fault-heavy task.
const SPEC: &str = "work 256 R 1000000 1";
/// Host sampling rates measured: the high rate and `vmm`'s default.
const RATES_HZ: [u64; 2] = [1000, 20];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Profiler on: guest side and host sampler.
    Tracking,
    /// Guest side only: regions published and written by the guest, no host sampler.
    GuestOnly,
}

/// User + system CPU time of this whole process (every thread, live or ended), seconds.
fn process_cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: writes one rusage we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// One VM run.
struct Run {
    /// Longest task runtime, seconds.
    runtime_s: f64,
    /// CPU time of the run (vCPU threads, sampler, event loop), seconds.
    cpu_s: f64,
    /// The vCPU threads' part of it, seconds.
    vcpu_cpu_s: f64,
    /// Host records the sampler wrote.
    records: u64,
}

/// Builds and runs the VM in this process.
fn run_once(mode: Mode, hz: u64, vcpus: usize, dir: &std::path::Path) -> Result<Run> {
    let period = Duration::from_nanos(1_000_000_000 / hz);
    let spec: TaskSpec = SPEC.parse().context("spec")?;
    let specs = vec![spec; vcpus];
    let mut built = workload::build(specs, vcpus, None, Some(period), dir).context("building")?;
    // Off: the regions stay (the guest keeps writing its region), the sampler is not started.
    let kept = match mode {
        Mode::Tracking => None,
        Mode::GuestOnly => built.profiling.take().map(|p| p.regions),
    };
    let cpu0 = process_cpu_s();
    let report = run_to_end(built);
    let cpu_s = process_cpu_s() - cpu0;
    drop(kept);
    let report = report?;
    let longest = report
        .tasks
        .iter()
        .map(|t| t.progress.elapsed_ns)
        .max()
        .context("no task")?;
    let vcpu_ns: u64 = report.vcpus.iter().map(|v| v.user_ns + v.system_ns).sum();
    Ok(Run {
        runtime_s: longest as f64 / 1e9,
        cpu_s,
        vcpu_cpu_s: vcpu_ns as f64 / 1e9,
        records: report.sampler.map_or(0, |s| s.records),
    })
}

/// Samples of one side.
#[derive(Default)]
struct Side {
    runtime: Vec<f64>,
    cpu: Vec<f64>,
    vcpu_cpu: Vec<f64>,
    other_cpu: Vec<f64>,
}

impl Side {
    fn push(&mut self, r: &Run) {
        self.runtime.push(r.runtime_s);
        self.cpu.push(r.cpu_s);
        self.vcpu_cpu.push(r.vcpu_cpu_s);
        self.other_cpu.push(r.cpu_s - r.vcpu_cpu_s);
    }
}

/// Benchmark 9: `pairs` back-to-back pairs at each rate, with 1 vCPU and with 2 (both CPUs
/// busy).
pub fn run(pairs: usize) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-tracking-{}", std::process::id()));
    let mut rows = Vec::new();
    let shapes = RATES_HZ.iter().flat_map(|&hz| [(hz, 1usize), (hz, 2)]);
    for (hz, vcpus) in shapes {
        // One warm-up pair.
        run_once(Mode::Tracking, hz, vcpus, &dir)?;
        run_once(Mode::GuestOnly, hz, vcpus, &dir)?;
        let (mut on, mut off, mut records) = (Side::default(), Side::default(), Vec::new());
        for i in 0..pairs.max(1) {
            // Alternate which side of the pair goes first.
            let order = if i % 2 == 0 {
                [Mode::Tracking, Mode::GuestOnly]
            } else {
                [Mode::GuestOnly, Mode::Tracking]
            };
            for mode in order {
                let r = run_once(mode, hz, vcpus, &dir)?;
                match mode {
                    Mode::Tracking => {
                        on.push(&r);
                        records.push(r.records as f64);
                    }
                    Mode::GuestOnly => off.push(&r),
                }
            }
        }
        let tasks = if vcpus == 1 {
            format!("`{SPEC}`, 1 vCPU")
        } else {
            format!("2 × `{SPEC}` on 2 vCPUs")
        };
        let pair_ratios =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
        let ticks = median(&records) / vcpus as f64;
        let per_tick = (median(&on.other_cpu) - median(&off.other_cpu)) * 1e6 / ticks.max(1.0);
        let cpu_note = format!(
            "CPU time = user + system time of the VMM's threads during the run (getrusage; \
             time spent waiting for a CPU does not count); of it, the vCPU threads: on {:.3} s, \
             off {:.3} s (median pair ratio {:.3}); the other threads (sampler, event loop, VM \
             teardown): on {:.3} s, off {:.3} s{}",
            median(&on.vcpu_cpu),
            median(&off.vcpu_cpu),
            median(&pair_ratios(&on.vcpu_cpu, &off.vcpu_cpu)),
            median(&on.other_cpu),
            median(&off.other_cpu),
            if ticks >= 100.0 {
                format!(", i.e. about {per_tick:.0} µs per sampler tick of {vcpus} vCPU(s)")
            } else {
                format!(" (too few ticks, {ticks:.0}, for a cost per tick)")
            },
        );
        for (what, unit_note, a, b) in [
            (
                "runtime",
                "runtime = the slowest task's Started → Finished".to_string(),
                &on.runtime,
                &off.runtime,
            ),
            ("VMM CPU time", cpu_note, &on.cpu, &off.cpu),
        ] {
            let ratios = pair_ratios(a, b);
            let id = format!(
                "host_tracking_{hz}hz_{vcpus}vcpu_{}",
                if what == "runtime" { "runtime" } else { "cpu" }
            );
            let row = Row::measured(
                9,
                &id,
                &format!("fault-heavy run ({tasks}), host fault tracking at {hz} Hz: {what}"),
                "s",
                median(a),
                "tracking off",
                Some(median(b)),
                Target::RatioAtMost { value: 1.02 },
                format!(
                    "ratio = median of {} per-pair ratios (on/off, back-to-back pairs, \
                     alternating order; pair ratios {}; ratio of the medians {:.3}); guest \
                     profiling on in both, only the host sampler differs ({:.0} host records \
                     per run); on: {} s, off: {} s; {unit_note}",
                    ratios.len(),
                    spread(&ratios, 3),
                    median(a) / median(b),
                    median(&records),
                    spread(a, 3),
                    spread(b, 3)
                ),
            );
            rows.push(row.with_ratio(median(&ratios)));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}
