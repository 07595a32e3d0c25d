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
//! - Both ways in one run: the same overhead pairs with `--pager uffd` (the VMM's own pager;
//!   with 1G the VMs' memory fits and nothing is registered, so also with `--mem 256M` under
//!   `--machine-mem 128M`, where every first touch is a userfaultfd round trip), and one VM of `work 48 R 20000 5` (12,288
//!   pages touched at random) under pressure with the same room for guest memory in either
//!   way: `--pager uffd --machine-mem 32M` (its budget counts guest pages only) against the
//!   cgroup's `--machine-mem 33M` (the cgroup also charges what the VMM allocates after moving
//!   in: about 1 MiB here, measured as the peak charge of the fitting run minus its guest
//!   pages), alternating, [`PRESSURE_RUNS`] runs each: work/s (iterations per second of task
//!   runtime) and host major faults/s (the vCPU thread's, which include the pager's swap-ins).
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::report::{median, spread, Row, Target};

const FITS: &str = "work 64 R 3000000";
const KNEE_BUDGET: &str = "160M";
const KNEE_WORKLOAD: &str = "work 32 R 400000";

const PRESSURE: &str = "work 48 R 20000 5";
const PRESSURE_RUNS: usize = 3;
/// The same 32 MiB of room for guest memory: the cgroup's budget also holds ~1 MiB of VMM.
const PRESSURE_UFFD: [&str; 4] = ["--machine-mem", "32M", "--pager", "uffd"];
const PRESSURE_CGROUP: [&str; 2] = ["--machine-mem", "33M"];

/// One run of the first task of `workload`: (runtime s, iterations, vCPU host major faults).
fn run_task(vmm: &Path, workload: &str, extra: &[&str], stats: &Path) -> Result<(f64, f64, f64)> {
    let mut cmd = Command::new(vmm);
    cmd.args(["--workload", workload, "--stats"]).arg(stats);
    cmd.args(extra);
    let out = cmd.output().context("running vmm")?;
    if !out.status.success() {
        bail!("vmm failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(stats)?)?;
    let task = &doc["tasks"][0];
    let ns = task["elapsed_ns"].as_f64().context("no task runtime")?;
    let iterations = task["iterations"].as_f64().unwrap_or(0.0);
    let majflt = doc["vcpus"][0]["host_major_faults"].as_f64().unwrap_or(0.0);
    Ok((ns / 1e9, iterations, majflt))
}

fn runtime_s(vmm: &Path, extra: &[&str], stats: &Path) -> Result<f64> {
    Ok(run_task(vmm, FITS, extra, stats)?.0)
}

fn overhead(
    vmm: &Path,
    pairs: usize,
    dir: &Path,
    (base, way): (&[&str], &[&str]),
    id: &str,
) -> Result<Row> {
    let stats = dir.join("budget-stats.json");
    let way: Vec<&str> = base.iter().chain(way).copied().collect();
    let way = way.as_slice();
    let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=pairs {
        let (a, b) = if i % 2 == 0 {
            let a = runtime_s(vmm, way, &stats)?;
            (a, runtime_s(vmm, base, &stats)?)
        } else {
            let b = runtime_s(vmm, base, &stats)?;
            (runtime_s(vmm, way, &stats)?, b)
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
        id,
        &format!(
            "budget cost on a workload that fits (`{FITS}`, {} vs {})",
            way.join(" "),
            if base.is_empty() {
                "none".to_string()
            } else {
                base.join(" ")
            }
        ),
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
        info_row(
            "budget_knee_n",
            format!("thrashing knee: N at peak work/s (`{what})"),
            ("VMs", knee_n),
            ("", None),
            note,
        ),
        info_row(
            "budget_knee_work",
            format!("work/s at the knee vs at N={} (`{what})", past[0]),
            ("iter/s", peak[2]),
            (&format!("N={}", past[0]), Some(past[2])),
            "workload iterations of all VMs per second of task runtime".into(),
        ),
        info_row(
            "budget_knee_majflt",
            format!("host major faults/s per VM at N={} (`{what})", past[0]),
            ("faults/s", past[3] / past[0]),
            ("at the knee", Some(peak[3] / peak[0])),
            "vCPU threads' major faults over task runtime, per VM".into(),
        ),
    ])
}

/// A group-14 row for information (no target): `ours` (unit, value) against `baseline`
/// (name, value).
fn info_row(
    id: &str,
    benchmark: String,
    (unit, ours): (&'static str, f64),
    (baseline_name, baseline): (&str, Option<f64>),
    note: String,
) -> Row {
    Row::measured(
        14,
        id,
        &benchmark,
        unit,
        ours,
        baseline_name,
        baseline,
        Target::None,
        note,
    )
}

/// Work/s and host major faults/s of the pressure runs of one way.
#[derive(Default)]
struct PressureRuns {
    work: Vec<f64>,
    faults: Vec<f64>,
}

/// Both ways under the same pressure: work/s and major faults/s, uffd against cgroup.
fn pressure(vmm: &Path, dir: &Path) -> Result<Vec<Row>> {
    let stats = dir.join("pressure-stats.json");
    let (mut uffd, mut cgroup) = (PressureRuns::default(), PressureRuns::default());
    for i in 0..PRESSURE_RUNS * 2 {
        let (way, runs): (&[&str], _) = if i % 2 == 0 {
            (&PRESSURE_UFFD, &mut uffd)
        } else {
            (&PRESSURE_CGROUP, &mut cgroup)
        };
        let (s, iterations, majflt) = run_task(vmm, PRESSURE, way, &stats)?;
        runs.work.push(iterations / s);
        runs.faults.push(majflt / s);
    }
    let what = format!(
        "`{PRESSURE}`, 32 MiB for guest memory: {} vs {}",
        PRESSURE_UFFD.join(" "),
        PRESSURE_CGROUP.join(" ")
    );
    Ok(vec![
        uffd_vs_cgroup(
            (
                "budget_pressure_work",
                &format!("work/s under pressure, uffd vs cgroup ({what})"),
            ),
            ("iter/s", 2),
            (&uffd.work, &cgroup.work),
            &format!("{PRESSURE_RUNS} runs each, alternating"),
        ),
        uffd_vs_cgroup(
            (
                "budget_pressure_majflt",
                &format!("host major faults/s under pressure, uffd vs cgroup ({what})"),
            ),
            ("faults/s", 0),
            (&uffd.faults, &cgroup.faults),
            "vCPU thread's major faults over task runtime",
        ),
    ])
}

/// A row of one measure (in `unit`, spreads shown with `digits` decimals) of the uffd runs
/// against the cgroup runs: medians, and the spreads in the note after `how`.
fn uffd_vs_cgroup(
    (id, benchmark): (&str, &str),
    (unit, digits): (&'static str, usize),
    (uffd, cgroup): (&[f64], &[f64]),
    how: &str,
) -> Row {
    info_row(
        id,
        benchmark.to_string(),
        (unit, median(uffd)),
        ("cgroup", Some(median(cgroup))),
        format!(
            "{how}; uffd {} vs cgroup {}",
            spread(uffd, digits),
            spread(cgroup, digits)
        ),
    )
}

/// The overhead pairs: row id, the options of both runs, the budget's options.
const OVERHEADS: [(&str, &[&str], &[&str]); 3] = [
    ("budget_overhead", &[], &["--machine-mem", "1G"]),
    // The VMs' memory fits 1G: the pager registers nothing.
    (
        "budget_uffd_overhead",
        &[],
        &["--machine-mem", "1G", "--pager", "uffd"],
    ),
    // 256 MiB declared over a 128M budget: registered, every first touch through the pager,
    // and the 64 MiB touched still fit (no eviction).
    (
        "budget_uffd_registered_overhead",
        &["--mem", "256M"],
        &["--machine-mem", "128M", "--pager", "uffd"],
    ),
];

/// The budget group.
pub fn run(vmm: &Path, pairs: usize) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for (id, base, way) in OVERHEADS {
        rows.push(overhead(vmm, pairs, &dir, (base, way), id)?);
    }
    rows.extend(pressure(vmm, &dir)?);
    rows.extend(knee(vmm, &dir)?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}
