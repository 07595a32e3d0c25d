//! Attribution error and cost: how far each task's charged host faults and KVM `pf_taken` are
//! from the pages it touched, in exact and sampled mode, and what exact mode costs on a
//! switch-heavy run.
//!
//! Error: N tasks (2, 4, 16) of different sizes share 1 or 2 vCPUs of the OS-less guest at the
//! default rate (20 Hz), taking turns by iteration. The guest's access streams are deterministic
//! (the VMM picks the seeds), so the bench replays them to know the pages each task touched; the
//! error of a run is the largest over its tasks of |charged − touched| / touched, for host faults
//! and for `pf_taken`. The group also writes these as a Markdown table (`--attribution-table`,
//! default `target/attribution-table.md`) for the README.
//!
//! Cost: 16 tiny tasks on one vCPU switch at every iteration (thousands of switches a second);
//! runtime in exact mode against sampled mode, and the switches per second exact mode closes
//! intervals at (the OS-less guest exits at each switch anyway, so it adds no exit).
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use mirrorball_workload::{AccessStream, Pattern, PAGE_BYTES};
use vmm::builder::workload;
use vmm::profiling::sampler::AttributionMode;
use vmm::report::RunReport;
use vmm::workload::TaskSpec;

use super::profiler::run_to_end;
use super::report::{median, spread, Row, Target};

/// The default sampling period.
const PERIOD: Duration = Duration::from_millis(50);

/// Distinct pages task `t` touches over its whole run.
fn distinct_pages(t: &mirrorball_workload::TaskParams) -> u64 {
    let pattern = Pattern::from_raw(t.pattern).unwrap_or(Pattern::Random);
    let mut stream = AccessStream::new(pattern, t.region_bytes, t.seed);
    let mut pages = BTreeSet::new();
    for _ in 0..t.accesses_per_iteration * u64::from(t.iterations) {
        pages.insert(stream.next_offset() % t.region_bytes / PAGE_BYTES);
    }
    pages.len() as u64
}

fn run(specs: &[TaskSpec], vcpus: usize, mode: Option<AttributionMode>) -> Result<RunReport> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-attr-{}", std::process::id()));
    let mut built = workload::build(specs.to_vec(), vcpus, None, mode.map(|_| PERIOD), &dir)
        .context("building")?;
    if let (Some(p), Some(mode)) = (built.profiling.as_mut(), mode) {
        p.set_attribution(mode);
    }
    run_to_end(built)
}

/// How far a run's tasks were charged from the pages they touched.
struct Errors {
    /// Largest |host faults − touched| / touched, percent.
    faults_pct: f64,
    /// Largest |pf_taken − touched| / touched, percent.
    pf_pct: f64,
    /// Largest |pf_taken − touched|, faults (KVM's constant extra: page tables, bitmap).
    pf_off: u64,
}

fn errors(specs: &[TaskSpec], vcpus: usize, report: &RunReport) -> Result<Errors> {
    let plan = vmm::workload::layout(specs, vcpus).context("layout")?;
    let mut e = Errors {
        faults_pct: 0.0,
        pf_pct: 0.0,
        pf_off: 0,
    };
    for (t, r) in plan.tasks.iter().zip(&report.tasks) {
        let pages = distinct_pages(t).max(1);
        let truth = pages as f64;
        let host = r.host.context("task not attributed")?;
        e.faults_pct = e
            .faults_pct
            .max((host.host_min_flt as f64 - truth).abs() / truth * 100.0);
        e.pf_pct = e
            .pf_pct
            .max((host.pf_taken as f64 - truth).abs() / truth * 100.0);
        e.pf_off = e.pf_off.max(host.pf_taken.abs_diff(pages));
    }
    Ok(e)
}

/// `n` tasks of different sizes and patterns, each touching its whole region.
fn specs(n: usize) -> Vec<TaskSpec> {
    (0..n)
        .map(|i| {
            let mib = [16u64, 4, 8, 2, 12][i % 5] / if n > 4 { 2 } else { 1 };
            let p = if i % 3 == 1 { 'L' } else { 'R' };
            // Enough accesses for every page: random needs about ln(pages) draws per page.
            let accesses = mib * 256 * if p == 'R' { 12 } else { 20 } / 6;
            format!("work {mib} {p} {accesses} 6").parse()
        })
        .collect::<Result<_, _>>()
        .unwrap_or_default()
}

/// The error rows and the README table.
fn error_rows(table_path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut table = String::from(
        "| tasks | vCPUs | exact: host faults, max error | exact: `pf_taken`, max \
         \\|charged − touched\\| | sampled: host faults, max error | sampled: `pf_taken`, max \
         error |\n|---|---|---|---|---|---|\n",
    );
    for n in [2usize, 4, 16] {
        for vcpus in [1usize, 2] {
            let specs = specs(n);
            let exact = run(&specs, vcpus, Some(AttributionMode::Exact))?;
            let sampled = run(&specs, vcpus, Some(AttributionMode::Sampled))?;
            let e = errors(&specs, vcpus, &exact)?;
            let s = errors(&specs, vcpus, &sampled)?;
            let (ef, ep, sf, sp) = (e.faults_pct, e.pf_pct, s.faults_pct, s.pf_pct);
            let _ = writeln!(
                table,
                "| {n} | {vcpus} | {ef:.2} % | {} faults ({ep:.1} %) | {sf:.1} % | {sp:.1} % |",
                e.pf_off
            );
            rows.push(Row::measured(
                10,
                &format!("attribution_error_{n}_tasks_{vcpus}_vcpus"),
                &format!("max per-task error of charged host faults, {n} tasks on {vcpus} vCPU(s), exact"),
                "%",
                ef,
                "sampled",
                Some(sf),
                Target::OursAtMost { value: 1.0 },
                format!(
                    "20 Hz; tasks {}; pf_taken error exact {ep:.2} %, sampled {sp:.1} % (KVM \
                     also counts the faults of the guest's page tables and bitmaps)",
                    specs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    if let Some(dir) = table_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(table_path, &table)
        .with_context(|| format!("writing {}", table_path.display()))?;
    eprintln!(
        "vmm_bench: attribution table written to {}:\n{table}",
        table_path.display()
    );
    Ok(rows)
}

/// Switch-heavy runs: exact against sampled.
fn cost_rows(pairs: usize) -> Result<Vec<Row>> {
    // 16 tasks on one vCPU, each iteration a few hundred accesses: a switch every few µs of
    // guest work, so the doorbell exit dominates.
    let specs: Vec<TaskSpec> = (0..16)
        .map(|i| format!("work 1 {} 200 400", if i % 2 == 0 { 'R' } else { 'L' }).parse())
        .collect::<Result<_, _>>()
        .context("specs")?;
    let (mut ratios, mut exact_s, mut sampled_s, mut rates) = (vec![], vec![], vec![], vec![]);
    for i in 0..pairs.max(1) {
        let order = if i % 2 == 0 {
            [AttributionMode::Exact, AttributionMode::Sampled]
        } else {
            [AttributionMode::Sampled, AttributionMode::Exact]
        };
        let mut pair = [0f64; 2];
        for mode in order {
            let report = run(&specs, 1, Some(mode))?;
            let secs = report.elapsed_ns as f64 / 1e9;
            if mode == AttributionMode::Exact {
                pair[0] = secs;
                let switches: u64 = report
                    .sampler
                    .as_ref()
                    .map_or(0, |s| s.announced_switches.iter().sum());
                rates.push(switches as f64 / secs);
            } else {
                pair[1] = secs;
            }
        }
        exact_s.push(pair[0]);
        sampled_s.push(pair[1]);
        ratios.push(pair[0] / pair[1]);
    }
    Ok(vec![Row::measured(
        10,
        "attribution_exact_cost_switch_heavy",
        "switch-heavy run (16 tasks on 1 vCPU, 6,400 switches), exact vs sampled attribution",
        "s",
        median(&exact_s),
        "sampled",
        Some(median(&sampled_s)),
        Target::None,
        format!(
            "median ratio of {} back-to-back pairs {:.3}; exact closes intervals at {:.0} \
             switches/s (the OS-less guest's doorbell exit at each switch exists in both modes: \
             exact mode adds 0 exits/s, it adds a counter read on the vCPU thread per switch); \
             exact {} s, sampled {} s",
            ratios.len(),
            median(&ratios),
            median(&rates),
            spread(&exact_s, 3),
            spread(&sampled_s, 3)
        ),
    )])
}

/// Group 10.
pub fn run_group(table_path: &Path, pairs: usize) -> Result<Vec<Row>> {
    let mut rows = error_rows(table_path)?;
    rows.append(&mut cost_rows(pairs)?);
    Ok(rows)
}
