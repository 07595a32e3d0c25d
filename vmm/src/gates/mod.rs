//! Fault and exit budgets as test gates (`vmm … --expect FILE.toml`) and run comparison
//! (`vmm diff BASE.json NEW.json`).
//!
//! Data flow: [`expect`] parses an expectation file before the VM runs (mistakes cost no run);
//! after the run, the VM's `--stats` report (per VM: [`stats::VmStats`], so fleets are judged
//! alike) goes through [`eval`], which yields one case per gate and VM or task; the cases are
//! printed one line per violation, written as JUnit XML ([`junit`]) and, under GitHub Actions,
//! as annotations ([`annotate`]). [`diff`] compares two stats files figure by figure.
//!
//! Exit codes (besides the VM's own, which win when the VM itself failed):
//!
//! | code | meaning |
//! |---|---|
//! | 10 | a gate was violated (one line per violated limit on stderr) |
//! | 11 | gates could not be judged: malformed expectation file, unknown figure, VM or task, figure not measured, missing or malformed baseline or stats file |
//! | 12 | `vmm diff`: a figure regressed beyond its tolerance |
use std::io::Write as _;
use std::path::PathBuf;

pub mod annotate;
pub mod diff;
pub mod eval;
pub mod expect;
pub mod junit;
pub mod stats;

use crate::exit::EXIT_VMM_ERROR;
use crate::report::RunReport;
use eval::Outcome;
use expect::Expectations;
use stats::VmStats;

/// Exit code: a gate was violated.
pub const EXIT_GATE_FAILED: i32 = 10;
/// Exit code: the gates could not be judged (bad expectation file, baseline or stats input).
pub const EXIT_GATE_INPUT: i32 = 11;
/// Exit code of `vmm diff`: a figure regressed beyond its tolerance.
pub const EXIT_DIFF_REGRESSED: i32 = 12;

/// A problem with the gates' input files.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The expectation file.
    #[error("{at}: {problem}")]
    Expect {
        /// File, and line when known.
        at: String,
        /// What is wrong.
        problem: String,
    },
    /// A `--stats` document (baseline, or an input of `vmm diff`).
    #[error("{path}: {problem}")]
    Stats {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
}

/// The gate options of a VM run.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct GateArgs {
    /// Judge the run against the gates of this TOML file after the VM ends (exit code 10 when
    /// one is violated, 11 when they cannot be judged; see the README's "Gates").
    #[arg(long, value_name = "FILE.toml")]
    pub expect: Option<PathBuf>,
    /// Baseline --stats JSON for relative gates [default: the expectation file's `baseline`].
    #[arg(long, value_name = "STATS.json", requires = "expect")]
    pub baseline: Option<PathBuf>,
    /// Write the judged gates as a JUnit XML report (one test case per gate and VM or task).
    #[arg(long, value_name = "PATH", requires = "expect")]
    pub junit: Option<PathBuf>,
}

/// The gates of one run, loaded before it starts.
#[derive(Debug, Default)]
pub struct Gates {
    loaded: Option<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    file: String,
    exp: Expectations,
    baseline: Option<Vec<VmStats>>,
    junit: Option<PathBuf>,
}

impl Gates {
    /// Reads the expectation file and its baseline. On a problem, prints one line and returns
    /// the exit code to end with ([`EXIT_GATE_INPUT`]). Without `--expect`, judges nothing.
    pub fn prepare(args: &GateArgs) -> Result<Self, i32> {
        let Some(path) = &args.expect else {
            return Ok(Self::default());
        };
        let loaded = (|| {
            let exp = expect::load(path, args.baseline.as_deref())?;
            let baseline = exp.baseline.as_deref().map(stats::load).transpose()?;
            Ok::<_, GateError>(Loaded {
                file: path.display().to_string(),
                exp,
                baseline,
                junit: args.junit.clone(),
            })
        })()
        .map_err(|e| {
            eprintln!("vmm: gates: {e} (exit code {EXIT_GATE_INPUT})");
            EXIT_GATE_INPUT
        })?;
        Ok(Self {
            loaded: Some(loaded),
        })
    }

    /// Judges a single VM's report; see [`Gates::judge`].
    pub fn judge_report(&self, report: &RunReport, end_code: i32) -> i32 {
        if self.loaded.is_none() {
            return end_code;
        }
        // Named by the report's `vm` field when it has one, else `vm0`.
        match serde_json::to_value(report)
            .map_err(|e| e.to_string())
            .and_then(stats::vms_of)
        {
            Ok(vms) => self.judge(&vms, end_code),
            Err(e) => {
                eprintln!("vmm: gates: cannot read the run's report: {e}");
                end_code.max(EXIT_VMM_ERROR)
            }
        }
    }

    /// Judges the run's VMs (each `--stats` report with its VM's name), prints one line per
    /// violation and a summary on stderr, writes the JUnit report and the GitHub annotations,
    /// and returns the process exit code: `end_code` when it is not 0 (the run itself failed),
    /// else [`EXIT_GATE_FAILED`], [`EXIT_GATE_INPUT`] or 0.
    pub fn judge(&self, vms: &[VmStats], end_code: i32) -> i32 {
        let Some(l) = &self.loaded else {
            return end_code;
        };
        let outcome = eval::evaluate(&l.exp, vms, l.baseline.as_deref());
        let mut code = gate_code(&outcome, end_code);
        for line in outcome.problem_lines() {
            eprintln!("vmm: {line}");
        }
        if let Some(path) = &l.junit {
            let run_time: f64 = vms
                .iter()
                .filter_map(|v| stats::Figure::RunTime.of_vm(&v.doc).ok())
                .fold(0.0, f64::max);
            let xml = junit::render(&outcome, &l.file, run_time);
            if let Err(e) = std::fs::write(path, xml) {
                eprintln!(
                    "vmm: gates: cannot write the JUnit report {}: {e}",
                    path.display()
                );
                if code == 0 {
                    code = EXIT_VMM_ERROR;
                }
            }
        }
        if std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true") {
            github_output(&outcome, &l.file);
        }
        let passed = outcome.cases.len() - outcome.failures() - outcome.errors();
        eprintln!(
            "vmm: gates ({}): {passed} passed, {} failed, {} not judged (exit code {code})",
            l.file,
            outcome.failures(),
            outcome.errors()
        );
        code
    }
}

/// The exit code for a judged run: the VM's own failure first, then violations, then gates
/// that could not be judged.
pub fn gate_code(outcome: &Outcome, end_code: i32) -> i32 {
    if end_code != 0 {
        end_code
    } else if outcome.failures() > 0 {
        EXIT_GATE_FAILED
    } else if outcome.errors() > 0 {
        EXIT_GATE_INPUT
    } else {
        0
    }
}

fn github_output(outcome: &Outcome, file: &str) {
    let mut out = std::io::stdout().lock();
    for line in annotate::error_lines(outcome, file) {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") {
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| f.write_all(annotate::summary_markdown(outcome, file).as_bytes()));
        if let Err(e) = appended {
            eprintln!("vmm: gates: cannot append to GITHUB_STEP_SUMMARY: {e}");
        }
    }
}
