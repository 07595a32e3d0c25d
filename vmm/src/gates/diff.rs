//! `vmm diff BASE.json NEW.json`: every figure of every VM and task of two `--stats` files side
//! by side with the change, marking what moved beyond its tolerance. Exit code
//! [`EXIT_DIFF_REGRESSED`](super::EXIT_DIFF_REGRESSED) when a cost went up beyond it.
//!
//! Each figure has a default tolerance from the run-to-run spread measured on the default
//! workload (README "Gates"): page-fault counts of a known workload are exact, exits, CPU and
//! wall time vary from run to run. `--tolerance PCT` replaces the percentages (each figure keeps
//! its minimum amount, so that small counts do not flag on a sample's worth of attribution).
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

use super::stats::{self, counterpart, Figure, VmStats};
use super::{EXIT_DIFF_REGRESSED, EXIT_GATE_INPUT};

/// `vmm diff`.
#[derive(Clone, Debug, clap::Args)]
pub struct DiffArgs {
    /// The baseline: a --stats JSON file.
    #[arg(value_name = "BASE.json")]
    pub base: PathBuf,
    /// The run to compare with it: a --stats JSON file.
    #[arg(value_name = "NEW.json")]
    pub new: PathBuf,
    /// Mark changes beyond this many percent of the baseline (e.g. 5 or 5%; each figure keeps
    /// its minimum amount) [default: per figure, from the measured run-to-run spread]
    #[arg(long, value_name = "PCT", value_parser = parse_percent)]
    pub tolerance: Option<f64>,
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let n: f64 = t
        .strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage"))?;
    if n.is_finite() && n >= 0.0 {
        Ok(n)
    } else {
        Err("a tolerance is a percentage >= 0".into())
    }
}

/// How far a figure may move before it is marked: a percentage of the baseline, but at least an
/// amount (so that tiny counts do not flag on ±1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Band {
    /// Percent of the baseline value.
    pub percent: f64,
    /// Minimum amount, in the figure's unit.
    pub floor: f64,
}

/// The default tolerance of a figure, VM-wide or per task (`per_task`), from the run-to-run
/// spread measured over 20 runs of the default workload on a shared 2-CPU PVM machine (README
/// "Gates": the measured spreads).
pub fn default_band(figure: &Figure, per_task: bool) -> Band {
    let (percent, floor) = match figure {
        // Exact in every run: a known workload's first touches, and what they cost the host
        // VM-wide (the same pages fault the same number of times).
        Figure::GuestMinorFaults | Figure::GuestMajorFaults | Figure::Iterations => (0.0, 0.0),
        Figure::HostMajorFaults | Figure::LostSamples => (0.0, 0.0),
        // Exits that reach the VMM: exact for the OS-less guest (its doorbells), but 31-33 %
        // apart between Linux boots (the serial driver polls the UART as fast as it runs).
        Figure::VmmExits | Figure::ExitsBy(_) => (50.0, 16.0),
        // Per task, host faults are what the sampler attributed: a page or two moves between
        // tasks at the edges of a sample.
        Figure::HostMinorFaults if per_task => (0.0, 8.0),
        Figure::HostMinorFaults | Figure::PfTaken | Figure::PfFixed if !per_task => (0.5, 16.0),
        // Attributed per task: 3 % spread on a quiet machine, up to 13 % when the sampler's
        // ticks ran late under load.
        Figure::PfTaken | Figure::PfFixed | Figure::Exits if per_task => (15.0, 64.0),
        // VM-wide KVM exits: 0.6 % apart for the default workload (its faults, plus timer
        // interrupts that follow the run time), 15 % between Linux boots on PVM.
        Figure::Exits => (20.0, 64.0),
        // Other KVM statistics: irq_exits varied by 68 %.
        Figure::Kvm(_) => (100.0, 64.0),
        // Times: what else the machine was doing (CPU time 31-35 %, wall time 3x here).
        Figure::CpuTime | Figure::UserTime => (50.0, 0.05),
        Figure::SystemTime => (100.0, 0.05),
        Figure::RunTime => (200.0, 0.05),
        Figure::Samples => (200.0, 4.0),
        Figure::LateTicks => (0.0, 10.0),
        _ => (0.0, 0.0),
    };
    Band { percent, floor }
}

/// Whether a higher value is worse (`None`: neither, e.g. iterations done).
fn higher_is_worse(figure: &Figure) -> Option<bool> {
    match figure {
        // Late ticks measure the host's load more than the guest.
        Figure::Iterations | Figure::Samples | Figure::LateTicks => None,
        _ => Some(true),
    }
}

/// How a row moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Within the tolerance.
    Same,
    /// A cost went up beyond the tolerance.
    Regressed,
    /// A cost went down beyond the tolerance.
    Improved,
    /// Moved beyond the tolerance, neither better nor worse.
    Changed,
    /// Present on one side only.
    Missing,
}

/// One compared figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// VM name.
    pub vm: String,
    /// "" for the VM, else the task's label.
    pub task: String,
    /// The figure.
    pub figure: Figure,
    /// Baseline value.
    pub base: Option<f64>,
    /// New value.
    pub new: Option<f64>,
    /// The verdict.
    pub mark: Mark,
}

/// Compares two documents; `tolerance` (percent) replaces the per-figure defaults.
pub fn compare(base: &[VmStats], new: &[VmStats], tolerance: Option<f64>) -> Vec<Row> {
    let mut rows = Vec::new();
    for vm in new {
        let b = counterpart(vm, new.len(), base);
        let row = |task: &str, figure: &Figure, bv: Option<f64>, nv: Option<f64>| Row {
            vm: vm.name.clone(),
            task: task.to_string(),
            figure: figure.clone(),
            base: bv,
            new: nv,
            mark: judge(figure, !task.is_empty(), bv, nv, tolerance),
        };
        for figure in stats::vm_table_figures() {
            let nv = figure.of_vm(&vm.doc).ok();
            let bv = b.and_then(|b| figure.of_vm(&b.doc).ok());
            let reason_unused = matches!(figure, Figure::ExitsBy(_))
                && nv.unwrap_or(0.0) == 0.0
                && bv.unwrap_or(0.0) == 0.0;
            if (nv.is_none() && bv.is_none()) || reason_unused {
                continue;
            }
            rows.push(row("", &figure, bv, nv));
        }
        let base_tasks = b.map_or(&[][..], |b| stats::tasks(&b.doc));
        let mut labels: Vec<(Option<u64>, &str)> = stats::tasks(&vm.doc)
            .iter()
            .map(stats::task_label)
            .collect();
        for t in base_tasks {
            let l = stats::task_label(t);
            if !labels.contains(&l) {
                labels.push(l);
            }
        }
        for label in labels {
            let find = |tasks: &[Value]| -> Option<Value> {
                tasks
                    .iter()
                    .find(|t| stats::task_label(t) == label)
                    .cloned()
            };
            let nt = find(stats::tasks(&vm.doc));
            let bt = find(base_tasks);
            let name = match label.0 {
                Some(i) => format!("task {i}: {}", label.1),
                None => format!("task {}", label.1),
            };
            for figure in stats::task_table_figures() {
                let nv = nt.as_ref().and_then(|t| figure.of_task(t).ok());
                let bv = bt.as_ref().and_then(|t| figure.of_task(t).ok());
                if nv.is_some() || bv.is_some() {
                    rows.push(row(&name, &figure, bv, nv));
                }
            }
        }
    }
    rows
}

/// The band of a figure: its default, or `--tolerance` percent with the default's floor.
pub fn band(figure: &Figure, per_task: bool, tolerance: Option<f64>) -> Band {
    let default = default_band(figure, per_task);
    tolerance.map_or(default, |percent| Band { percent, ..default })
}

fn judge(
    figure: &Figure,
    per_task: bool,
    base: Option<f64>,
    new: Option<f64>,
    tolerance: Option<f64>,
) -> Mark {
    let (Some(b), Some(n)) = (base, new) else {
        return Mark::Missing;
    };
    let band = band(figure, per_task, tolerance);
    let allowed = (b.abs() * band.percent / 100.0).max(band.floor);
    let delta = n - b;
    if delta.abs() <= allowed + f64::EPSILON * b.abs().max(1.0) {
        return Mark::Same;
    }
    match higher_is_worse(figure) {
        None => Mark::Changed,
        Some(true) if delta > 0.0 => Mark::Regressed,
        Some(_) => Mark::Improved,
    }
}

/// The table, one row per figure, grouped by VM and task.
pub fn render(rows: &[Row], tolerance: Option<f64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:>14} {:>14} {:>13} {:>8}  tolerance",
        "figure", "base", "new", "change", "change%"
    );
    let mut group = None;
    for r in rows {
        let g = (&r.vm, &r.task);
        if group != Some(g) {
            let _ = writeln!(
                out,
                "== {}{}",
                r.vm,
                if r.task.is_empty() {
                    String::new()
                } else {
                    format!(" / {}", r.task)
                }
            );
            group = Some(g);
        }
        let show = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| r.figure.show(v));
        let (change, pct) = match (r.base, r.new) {
            (Some(b), Some(n)) => {
                let d = n - b;
                let sign = if d >= 0.0 { "+" } else { "-" };
                let pct = if b != 0.0 {
                    format!("{:+.1}%", 100.0 * d / b.abs())
                } else if d == 0.0 {
                    "+0.0%".to_string()
                } else {
                    "new".to_string()
                };
                (format!("{sign}{}", r.figure.show(d.abs())), pct)
            }
            _ => ("-".to_string(), "-".to_string()),
        };
        let band = band(&r.figure, !r.task.is_empty(), tolerance);
        let band_text = if band.floor > 0.0 {
            format!("{}% (min {})", band.percent, r.figure.show(band.floor))
        } else {
            format!("{}%", band.percent)
        };
        let mark = match r.mark {
            Mark::Same => "",
            Mark::Regressed => "  REGRESSED",
            Mark::Improved => "  improved",
            Mark::Changed => "  changed",
            Mark::Missing => "  (one side only)",
        };
        let _ = writeln!(
            out,
            "  {:<32} {:>14} {:>14} {:>13} {:>8}  {band_text}{mark}",
            r.figure.to_string(),
            show(r.base),
            show(r.new),
            change,
            pct
        );
    }
    out
}

/// Runs `vmm diff`: prints the table and returns the exit code (0, [`EXIT_DIFF_REGRESSED`], or
/// [`EXIT_GATE_INPUT`] with one line when an input is unusable).
pub fn run(args: &DiffArgs) -> i32 {
    let load = |p: &PathBuf| {
        stats::load(p).map_err(|e| {
            eprintln!("vmm: diff: {e} (exit code {EXIT_GATE_INPUT})");
        })
    };
    let (Ok(base), Ok(new)) = (load(&args.base), load(&args.new)) else {
        return EXIT_GATE_INPUT;
    };
    let unmatched: Vec<&str> = new
        .iter()
        .filter(|vm| counterpart(vm, new.len(), &base).is_none())
        .map(|vm| vm.name.as_str())
        .collect();
    let rows = compare(&base, &new, args.tolerance);
    print!("{}", render(&rows, args.tolerance));
    let regressed = rows.iter().filter(|r| r.mark == Mark::Regressed).count();
    let improved = rows.iter().filter(|r| r.mark == Mark::Improved).count();
    if !unmatched.is_empty() {
        eprintln!(
            "vmm: diff: not in the baseline: {} (compared with nothing)",
            unmatched.join(", ")
        );
    }
    let code = if regressed > 0 {
        EXIT_DIFF_REGRESSED
    } else {
        0
    };
    eprintln!(
        "vmm: diff: {} figure(s), {regressed} regressed, {improved} improved beyond tolerance \
         (exit code {code})",
        rows.len()
    );
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(exits: u64, cpu_ns: u64, guest: u64) -> Vec<VmStats> {
        stats::vms_of(json!({
            "end": {"exit_code": 0},
            "elapsed_ns": 1_000_000_000u64,
            "vcpus": [{"index": 0, "exits": {"mmio_write": exits}, "total_exits": exits,
                       "host_minor_faults": 1000, "host_major_faults": 0, "user_ns": cpu_ns,
                       "system_ns": 0, "kvm_stats": {"pf_taken": 990, "exits": exits}}],
            "tasks": [{"task": 0, "spec": "work 1 R 10", "guest_min_flt": guest,
                       "iterations": 20, "elapsed_ns": 900_000_000u64}]
        }))
        .expect("vm")
    }

    fn mark(rows: &[Row], task: bool, figure: &str) -> Mark {
        let f = Figure::parse(figure).expect("figure");
        rows.iter()
            .find(|r| r.figure == f && r.task.is_empty() != task)
            .map(|r| r.mark)
            .expect(figure)
    }

    #[test]
    fn marks_follow_the_tolerances() {
        let rows = compare(
            &vm(1000, 1_000_000_000, 256),
            &vm(1300, 400_000_000, 255),
            None,
        );
        assert_eq!(mark(&rows, false, "exits"), Mark::Regressed, "+30% > 20%");
        assert_eq!(
            mark(&rows, false, "exits.mmio_write"),
            Mark::Same,
            "+30% < 50%"
        );
        assert_eq!(mark(&rows, false, "cpu_time_s"), Mark::Improved, "-60%");
        assert_eq!(mark(&rows, false, "host_minor_faults"), Mark::Same);
        assert_eq!(mark(&rows, false, "vmm_exits"), Mark::Same, "+300 < 50%");
        assert_eq!(
            mark(&rows, true, "guest_minor_faults"),
            Mark::Improved,
            "exact"
        );
        assert_eq!(mark(&rows, true, "iterations"), Mark::Same);
        assert!(
            !rows.iter().any(|r| r.figure.to_string() == "exits.io_in"),
            "unused exit reasons are left out"
        );
        let rows = compare(&vm(1000, 1, 256), &vm(1200, 1, 256), Some(10.0));
        assert_eq!(
            mark(&rows, false, "exits"),
            Mark::Regressed,
            "--tolerance 10"
        );
        let rows = compare(&vm(1000, 1, 256), &vm(1200, 1, 256), Some(25.0));
        assert_eq!(mark(&rows, false, "exits"), Mark::Same, "--tolerance 25");
        let table = render(&rows, Some(25.0));
        assert!(table.contains("== vm0 / task 0: work 1 R 10"), "{table}");
        assert!(table.contains("+200"), "{table}");
        assert!(table.contains("+20.0%"), "{table}");
    }

    #[test]
    fn percentages_parse() {
        assert_eq!(parse_percent("5"), Ok(5.0));
        assert_eq!(parse_percent("2.5%"), Ok(2.5));
        assert!(parse_percent("-1").is_err());
        assert!(parse_percent("x").is_err());
    }
}
