//! Profiler overhead: the OS-less workload's runtime with the profiler (guest samples every
//! iteration, host sampler at 1 kHz) against the same workload with the profiler off, in one run.
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result};
use vmm::builder::{workload, BuiltVm};
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

/// Interleaved runs with the profiler at 1 kHz and off.
pub fn run(runs: usize) -> Result<Vec<Row>> {
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
