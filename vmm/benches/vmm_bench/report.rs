//! Results: rows of (ours, baseline, ratio, target, verdict), printed as a Markdown table and
//! written as JSON.
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What a row's target constrains.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// No target: the numbers are for information.
    None,
    /// `ours` must be at most this (in the row's unit).
    OursAtMost {
        /// Limit.
        value: f64,
    },
    /// `ours / baseline` must be at most this.
    RatioAtMost {
        /// Limit.
        value: f64,
    },
}

/// One benchmark result.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Issue benchmark number (1–5), for ordering.
    pub group: u8,
    /// Stable identifier.
    pub id: String,
    /// What was measured.
    pub benchmark: String,
    /// Unit of `ours` and `baseline`.
    pub unit: &'static str,
    /// Through Mirrorball.
    pub ours: Option<f64>,
    /// What `baseline` is.
    pub baseline_name: String,
    /// The reference measured in the same run.
    pub baseline: Option<f64>,
    /// `ours / baseline`.
    pub ratio: Option<f64>,
    /// The target.
    pub target: Target,
    /// "pass", "miss", "info" or "skipped".
    pub verdict: &'static str,
    /// Samples behind each median, how it was measured, or why it was skipped.
    pub note: String,
}

impl Row {
    /// A measured row; the ratio and the verdict follow from the numbers and the target.
    #[allow(clippy::too_many_arguments)]
    pub fn measured(
        group: u8,
        id: &str,
        benchmark: &str,
        unit: &'static str,
        ours: f64,
        baseline_name: &str,
        baseline: Option<f64>,
        target: Target,
        note: String,
    ) -> Self {
        let ratio = baseline.filter(|b| *b > 0.0).map(|b| ours / b);
        let verdict = match target {
            Target::None => "info",
            Target::OursAtMost { value } if ours <= value => "pass",
            Target::RatioAtMost { value } if ratio.is_some_and(|r| r <= value) => "pass",
            _ => "miss",
        };
        Self {
            group,
            id: id.into(),
            benchmark: benchmark.into(),
            unit,
            ours: Some(ours),
            baseline_name: baseline_name.into(),
            baseline,
            ratio,
            target,
            verdict,
            note,
        }
    }

    /// The same row with `ratio` in place of `ours / baseline` (e.g. the median of per-pair
    /// ratios of interleaved runs, steadier than the ratio of medians on a noisy machine); the
    /// verdict follows the new ratio.
    pub fn with_ratio(mut self, ratio: f64) -> Self {
        self.ratio = Some(ratio);
        if let Target::RatioAtMost { value } = self.target {
            self.verdict = if ratio <= value { "pass" } else { "miss" };
        }
        self
    }

    /// A row that could not be measured, with the reason.
    pub fn skipped(group: u8, id: &str, benchmark: &str, target: Target, why: String) -> Self {
        Self {
            group,
            id: id.into(),
            benchmark: benchmark.into(),
            unit: "",
            ours: None,
            baseline_name: String::new(),
            baseline: None,
            ratio: None,
            target,
            verdict: "skipped",
            note: why,
        }
    }
}

/// Median of `samples` (mean of the middle two for an even count); NaN when empty.
pub fn median(samples: &[f64]) -> f64 {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    }
}

/// Smallest and largest of `samples`, as "min–max" with `digits` decimals.
pub fn spread(samples: &[f64], digits: usize) -> String {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.digits$}–{max:.digits$}")
}

/// The Markdown table, then one numbered note per row (the README's format, without its run
/// column).
pub fn markdown(rows: &[Row]) -> String {
    let stored: Vec<crate::readme::StoredRow> = rows
        .iter()
        .map(|r| crate::readme::StoredRow::new(r, "", 0))
        .collect();
    crate::readme::table(&stored, false)
}

/// Everything `--json` writes.
#[derive(Serialize)]
pub struct JsonReport<'a> {
    /// Host KVM kind ("pvm", "intel", ...).
    pub host: String,
    /// Unix time of the run, seconds.
    pub unix_time: u64,
    /// The rows, in table order.
    pub rows: &'a [Row],
}

/// Writes the rows as pretty JSON to `path`.
pub fn write_json(path: &Path, host: &str, rows: &[Row]) -> Result<()> {
    let report = JsonReport {
        host: host.to_string(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        rows,
    };
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
