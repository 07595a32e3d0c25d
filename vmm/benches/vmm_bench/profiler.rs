//! Profiler overhead: the OS-less workload's runtime with the profiler (guest samples every
//! iteration, host sampler at 1 kHz) against the same workload with the profiler off, in one run;
//! launch → exit of the smallest workload with the profiler at its default against off (a VM
//! ends the moment it should, the sampler does not hold it up); the sampler's own cost per tick
//! and vCPU.
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vmm::builder::{workload, BuiltVm};
use vmm::profiling::sampler::SamplerReport;
use vmm::report::RunReport;
use vmm::session::{self, SessionOptions};
use vmm::workload::TaskSpec;

use super::report::{median, spread, Row, Target};

/// The fault-heavy task both sides run: every page of 64 MiB first-touched, then random accesses.
const SPEC: &str = "work 64 R 100000";

/// Runs a built workload VM in this process to its end (at most 120 s); fails unless every task
/// finished.
pub fn run_to_end(built: BuiltVm) -> Result<RunReport> {
    let interrupted = AtomicBool::new(false);
    let report = session::run(
        built,
        SessionOptions {
            timeout: Some(Duration::from_secs(120)),
            interrupted: &interrupted,
            console_input: false,
            keep_regions: None,
        },
    )
    .context("running")?;
    anyhow::ensure!(
        report.end.kind == "workload_finished",
        "ended: {}",
        report.end.message
    );
    Ok(report)
}

fn elapsed_s(period: Option<Duration>, run_dir: &std::path::Path) -> Result<f64> {
    let spec: TaskSpec = SPEC.parse().context("spec")?;
    let built = workload::build(vec![spec], 1, None, period, run_dir).context("building")?;
    let report = run_to_end(built)?;
    let task = report.tasks.first().context("no task")?;
    Ok(task.progress.elapsed_ns as f64 / 1e9)
}

/// Wall time of `vmm --workload "work 1 R 1 1" --sample-hz HZ`, ms.
fn launch_ms(vmm: &Path, hz: u32) -> Result<f64> {
    let start = Instant::now();
    let status = Command::new(vmm)
        .args(["--workload", "work 1 R 1 1", "--sample-hz", &hz.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("spawning vmm")?;
    anyhow::ensure!(status.success(), "vmm failed: {status}");
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// Launch → exit with the profiler at its default (20 Hz) against off, interleaved.
fn launch_rows(vmm: &Path, runs: usize) -> Result<Vec<Row>> {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    launch_ms(vmm, 20)?;
    for _ in 0..runs.max(1) {
        on.push(launch_ms(vmm, 20)?);
        off.push(launch_ms(vmm, 0)?);
    }
    Ok(vec![Row::measured(
        6,
        "launch_workload_profiler_default_vs_off",
        "launch → exit of `vmm --workload \"work 1 R 1 1\"`, profiler at 20 Hz (default)",
        "ms",
        median(&on),
        "--sample-hz 0",
        Some(median(&off)),
        Target::RatioAtMost { value: 1.3 },
        format!(
            "median of {} interleaved spawns each, spawn to exit status; on: {} ms, off: {} ms",
            on.len(),
            spread(&on, 2),
            spread(&off, 2)
        ),
    )])
}

/// The sampler's report of the tick-cost workload on `vcpus` vCPUs, sampled every `period`.
fn sampled_run(dir: &Path, vcpus: usize, period: Duration) -> Result<SamplerReport> {
    let spec: TaskSpec = "work 64 R 400000".parse().context("spec")?;
    let built =
        workload::build(vec![spec; vcpus], vcpus, None, Some(period), dir).context("building")?;
    run_to_end(built)?.sampler.context("no sampler report")
}

/// The sampler's own time per tick and vCPU at 1 kHz, on 1 and 2 vCPUs; and at 10 kHz.
fn tick_cost_rows(dir: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for vcpus in [1usize, 2] {
        let s = sampled_run(dir, vcpus, Duration::from_millis(1))?;
        let (stat_tick, light_tick) = s.tick_cost_ns_by_kind();
        rows.push(Row::measured(
            6,
            &format!("sampler_tick_cost_{vcpus}_vcpus"),
            &format!("host sampler time per tick and vCPU, 1 kHz, {vcpus} vCPU(s)"),
            "µs",
            s.tick_cost_ns_per_vcpu() / 1e3,
            "",
            None,
            Target::OursAtMost { value: 5.0 },
            format!(
                "{} ticks ({} late), {} records; the sampler thread's CPU time on each vCPU \
                 (KVM's binary stats and the thread's CPU clock every tick; its /proc stat \
                 line, for host faults, in {} of {} vCPU reads, when the thread may have \
                 faulted; its schedstat wait in {}; closing its interval, writing its \
                 records), per tick. Ticks that read a stat line: {:.1} µs per vCPU; the \
                 others: {:.1} µs",
                s.ticks,
                s.late_ticks,
                s.records,
                s.stat_reads,
                s.vcpu_reads,
                s.wait_reads,
                stat_tick / 1e3,
                light_tick / 1e3
            ),
        ));
        rows.push(Row::measured(
            6,
            &format!("sampler_tick_fixed_{vcpus}_vcpus"),
            &format!("host sampler time per tick besides the vCPUs, 1 kHz, {vcpus} vCPU(s)"),
            "µs",
            s.tick_cost_ns_fixed() / 1e3,
            "",
            None,
            Target::None,
            "the tick's own: the guest region's header check, copy-on-write records, clocks".into(),
        ));
    }
    let fast = sampled_run(dir, 1, Duration::from_micros(100))?;
    rows.push(Row::measured(
        6,
        "sampler_tick_cost_1_vcpus_10khz",
        "host sampler time per tick and vCPU, 10 kHz, 1 vCPU",
        "µs",
        fast.tick_cost_ns_per_vcpu() / 1e3,
        "",
        None,
        Target::None,
        format!(
            "the same run and reads as at 1 kHz ({} ticks, {} stat line reads): what a tick \
             costs when the sampler's CPU has not gone idle for a millisecond since the last",
            fast.ticks, fast.stat_reads
        ),
    ));
    Ok(rows)
}

/// Interleaved runs with the profiler at 1 kHz and off; launch and per-tick rows.
pub fn run(vmm: &Path, launch_runs: usize, runs: usize) -> Result<Vec<Row>> {
    let mut rows = launch_rows(vmm, launch_runs)?;
    let dir = std::env::temp_dir().join(format!("vmm-bench-sampler-{}", std::process::id()));
    rows.append(&mut tick_cost_rows(&dir)?);
    let _ = std::fs::remove_dir_all(&dir);
    rows.append(&mut super::probes::rows()?);
    rows.append(&mut overhead_rows(runs)?);
    Ok(rows)
}

/// Interleaved runs with the profiler at 1 kHz and off.
fn overhead_rows(runs: usize) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-profiler-{}", std::process::id()));
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..runs.max(1) * 2 {
        if i % 2 == 0 {
            on.push(elapsed_s(Some(Duration::from_millis(1)), &dir)?);
        } else {
            off.push(elapsed_s(None, &dir)?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (m_on, m_off) = (median(&on), median(&off));
    Ok(vec![Row::measured(
        6,
        "profiler_overhead",
        &format!("OS-less `{SPEC}` runtime, profiler at 1 kHz (guest samples + host sampler)"),
        "s",
        m_on,
        "profiler off",
        Some(m_off),
        Target::RatioAtMost { value: 1.01 },
        format!(
            "median of {} interleaved runs each; on: {}, off: {} (host fault tracking alone, on a fault-heavy run: group 9)",
            on.len(),
            spread(&on, 3),
            spread(&off, 3)
        ),
    )])
}
