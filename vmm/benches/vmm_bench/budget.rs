//! Machine-memory budget (`--machine-mem`): its cost on a workload that fits, and the thrashing
//! knee of N VMs under one budget.
//!
//! - Overhead: `work 64 R 3000000` (one VM, 64 MiB, random) run as a `vmm` process with
//!   `--machine-mem 1G` (the cgroup is set up, nothing is swapped) and without, in back-to-back
//!   pairs alternating which goes first; runtime = the task's runtime from `--stats`; the ratio
//!   is the median of the pairs' ratios (target ≤ 1.05).
//! - Knee: `vmm study thrash --vms 1..6 --machine-mem 160M --workload "work 32 R 400000"`: N at
//!   peak total work/s, work/s there and at 2× the knee, and host major faults/s per VM at 2×
//!   the knee (or at the largest N when 2× the knee is past 6).
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::report::{median, spread, Row, Target};

const FITS: &str = "work 64 R 3000000";
const KNEE_BUDGET: &str = "160M";
const KNEE_WORKLOAD: &str = "work 32 R 400000";

fn runtime_s(vmm: &Path, budget: bool, stats: &Path) -> Result<f64> {
    let mut cmd = Command::new(vmm);
    cmd.args(["--workload", FITS, "--stats"]).arg(stats);
    if budget {
        cmd.args(["--machine-mem", "1G"]);
    }
    let out = cmd.output().context("running vmm")?;
    if !out.status.success() {
        bail!("vmm failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(stats)?)?;
    let ns = doc["tasks"][0]["elapsed_ns"]
        .as_f64()
        .context("no task runtime")?;
    Ok(ns / 1e9)
}

fn overhead(vmm: &Path, pairs: usize, dir: &Path) -> Result<Row> {
    let stats = dir.join("budget-stats.json");
    let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=pairs {
        let (a, b) = if i % 2 == 0 {
            let a = runtime_s(vmm, true, &stats)?;
            (a, runtime_s(vmm, false, &stats)?)
        } else {
            let b = runtime_s(vmm, false, &stats)?;
            (runtime_s(vmm, true, &stats)?, b)
        };
        if i == 0 {
            continue; // warm-up
        }
        on.push(a);
        off.push(b);
        ratios.push(a / b);
    }
    Ok(Row::measured(
        14,
        "budget_overhead",
        &format!("budget cost on a workload that fits (`{FITS}`, --machine-mem 1G vs none)"),
        "s",
        median(&on),
        "no budget",
        Some(median(&off)),
        Target::RatioAtMost { value: 1.05 },
        format!(
            "{pairs} pairs, ratio = median of pair ratios ({}); runtimes {} s vs {} s",
            spread(&ratios, 3),
            spread(&on, 2),
            spread(&off, 2)
        ),
    )
    .with_ratio(median(&ratios)))
}

fn knee(vmm: &Path, dir: &Path) -> Result<Vec<Row>> {
    let out_dir = dir.join("thrash");
    let out = Command::new(vmm)
        .args([
            "study",
            "thrash",
            "--vms",
            "1..6",
            "--machine-mem",
            KNEE_BUDGET,
        ])
        .args(["--workload", KNEE_WORKLOAD, "--out"])
        .arg(&out_dir)
        .output()
        .context("running vmm study thrash")?;
    if !out.status.success() {
        bail!("study failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let csv = std::fs::read_to_string(out_dir.join("summary.csv"))?;
    // vms,seconds,work_per_s,host_major_faults_per_s,guest_faults_per_s,cpu_percent,seed
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').filter_map(|v| v.parse().ok()).collect())
        .collect();
    let peak = rows
        .iter()
        .max_by(|a, b| a[2].total_cmp(&b[2]))
        .context("empty study")?;
    let knee_n = peak[0];
    let past = rows
        .iter()
        .find(|r| (r[0] - 2.0 * knee_n).abs() < 0.5)
        .or(rows.last())
        .context("empty study")?;
    let what = format!("{KNEE_WORKLOAD}` per VM, --machine-mem {KNEE_BUDGET}");
    let table: Vec<String> = rows
        .iter()
        .map(|r| format!("{}: {:.1}", r[0], r[2]))
        .collect();
    let note = format!("work/s by N: {}", table.join(", "));
    Ok(vec![
        Row::measured(
            14,
            "budget_knee_n",
            &format!("thrashing knee: N at peak work/s (`{what})"),
            "VMs",
            knee_n,
            "",
            None,
            Target::None,
            note,
        ),
        Row::measured(
            14,
            "budget_knee_work",
            &format!("work/s at the knee vs at N={} (`{what})", past[0]),
            "iter/s",
            peak[2],
            &format!("N={}", past[0]),
            Some(past[2]),
            Target::None,
            "workload iterations of all VMs per second of task runtime".into(),
        ),
        Row::measured(
            14,
            "budget_knee_majflt",
            &format!("host major faults/s per VM at N={} (`{what})", past[0]),
            "faults/s",
            past[3] / past[0],
            "at the knee",
            Some(peak[3] / peak[0]),
            Target::None,
            "vCPU threads' major faults over task runtime, per VM".into(),
        ),
    ])
}

/// The budget group.
pub fn run(vmm: &Path, pairs: usize) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = vec![overhead(vmm, pairs, &dir)?];
    rows.extend(knee(vmm, &dir)?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}
