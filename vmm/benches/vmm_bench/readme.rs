//! The README's benchmark table, generated: `--update-readme` merges this run's rows into the
//! stored results (`vmm/benches/results.json`; a group that ran replaces that group's stored
//! rows, the others are kept with the run they come from) and rewrites the block between
//! [`BEGIN`] and [`END`] in `README.md` from them. `vmm/tests/readme_bench.rs` checks that the
//! README's block is exactly what the stored results render to, so a number in the README is
//! always one a run of the benchmark produced.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::report::{Row, Target};

/// First line of the generated block in the README.
pub const BEGIN: &str = "<!-- vmm_bench:begin (generated from vmm/benches/results.json by `cargo bench -p vmm --bench vmm_bench -- --update-readme`; do not edit) -->";
/// Last line of the generated block.
pub const END: &str = "<!-- vmm_bench:end -->";

/// One stored result: a [`Row`] plus the run it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRow {
    /// Benchmark group number (table order).
    pub group: u8,
    /// Stable identifier.
    pub id: String,
    /// What was measured.
    pub benchmark: String,
    /// Unit of `ours` and `baseline`.
    pub unit: String,
    /// Through Mirrorball.
    pub ours: Option<f64>,
    /// What `baseline` is.
    pub baseline_name: String,
    /// The reference measured in the same run.
    pub baseline: Option<f64>,
    /// The ratio reported.
    pub ratio: Option<f64>,
    /// The target.
    pub target: Target,
    /// "pass", "miss", "info" or "skipped".
    pub verdict: String,
    /// How it was measured.
    pub note: String,
    /// Host KVM kind of the run.
    pub host: String,
    /// Unix time of the run, seconds.
    pub unix_time: u64,
}

impl StoredRow {
    /// `row` as measured on `host` at `unix_time`.
    pub fn new(row: &Row, host: &str, unix_time: u64) -> Self {
        Self {
            group: row.group,
            id: row.id.clone(),
            benchmark: row.benchmark.clone(),
            unit: row.unit.to_string(),
            ours: row.ours,
            baseline_name: row.baseline_name.clone(),
            baseline: row.baseline,
            ratio: row.ratio,
            target: row.target,
            verdict: row.verdict.to_string(),
            note: row.note.clone(),
            host: host.to_string(),
            unix_time,
        }
    }
}

/// The stored results file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Stored {
    /// Rows in table order.
    pub rows: Vec<StoredRow>,
}

/// `stored` with every group that `new` has replaced by `new`'s rows, in group order.
pub fn merge(stored: Vec<StoredRow>, new: Vec<StoredRow>) -> Vec<StoredRow> {
    let ran: BTreeSet<u8> = new.iter().map(|r| r.group).collect();
    let mut rows: Vec<StoredRow> = stored
        .into_iter()
        .filter(|r| !ran.contains(&r.group))
        .chain(new)
        .collect();
    rows.sort_by_key(|r| r.group);
    rows
}

fn value(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0} {unit}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1} {unit}"),
        Some(x) => format!("{x:.3} {unit}"),
        None => "—".into(),
    }
}

fn target_text(target: Target, unit: &str) -> String {
    match target {
        Target::None => "—".into(),
        Target::OursAtMost { value } => format!("≤ {value} {unit}"),
        Target::RatioAtMost { value } => format!("ratio ≤ {value}×"),
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time.
pub fn date(unix_time: u64) -> String {
    // Days to a civil date (proleptic Gregorian), after H. Hinnant's `civil_from_days`.
    let z = i64::try_from(unix_time / 86_400).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The Markdown table of `rows`, then one numbered note per row. With `runs`, a last column
/// names each row's run (host KVM kind and date).
pub fn table(rows: &[StoredRow], runs: bool) -> String {
    let mut out = String::new();
    let run_head = if runs { " run |" } else { "" };
    let run_rule = if runs { "---|" } else { "" };
    let _ = writeln!(
        out,
        "| # | benchmark | ours | baseline | ratio | target | verdict |{run_head}"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---|---|{run_rule}");
    for (i, r) in rows.iter().enumerate() {
        let baseline = if r.baseline.is_some() {
            format!("{} ({})", value(r.baseline, &r.unit), r.baseline_name)
        } else {
            "—".into()
        };
        let ratio = r.ratio.map_or("—".into(), |x| format!("{x:.2}×"));
        let run = if runs {
            format!(" {}, {} |", r.host, date(r.unix_time))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |{run}",
            i + 1,
            r.benchmark,
            value(r.ours, &r.unit),
            baseline,
            ratio,
            target_text(r.target, &r.unit),
            r.verdict
        );
    }
    let _ = writeln!(out);
    for (i, r) in rows.iter().enumerate() {
        if !r.note.is_empty() {
            let _ = writeln!(out, "{}. `{}`: {}", i + 1, r.id, r.note.replace('\n', " "));
        }
    }
    out
}

/// The whole generated block, markers included.
pub fn block(rows: &[StoredRow]) -> String {
    format!("{BEGIN}\n\n{}\n{END}", table(rows, true))
}

/// `readme` with its generated block replaced by `block`.
pub fn splice(readme: &str, block: &str) -> Result<String> {
    let Some(start) = readme.find(BEGIN) else {
        bail!("the README has no line {BEGIN:?}")
    };
    let Some(len) = readme[start..].find(END) else {
        bail!("the README has no line {END:?} after the begin marker")
    };
    let end = start + len + END.len();
    Ok(format!("{}{block}{}", &readme[..start], &readme[end..]))
}

/// The generated block currently in `readme` (the README test compares it).
#[allow(dead_code)]
pub fn current_block(readme: &str) -> Option<&str> {
    let start = readme.find(BEGIN)?;
    let len = readme[start..].find(END)?;
    Some(&readme[start..start + len + END.len()])
}

/// Reads the stored results (none yet: empty).
pub fn load(path: &Path) -> Result<Vec<StoredRow>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice::<Stored>(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?
            .rows),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Merges `rows` (this run, on `host`) into the stored results at `results` and rewrites the
/// generated block of the README at `readme`.
pub fn update(results: &Path, readme: &Path, host: &str, rows: &[Row]) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let new: Vec<StoredRow> = rows.iter().map(|r| StoredRow::new(r, host, now)).collect();
    let merged = merge(load(results)?, new);
    let text = serde_json::to_string_pretty(&Stored {
        rows: merged.clone(),
    })?;
    std::fs::write(results, text + "\n")
        .with_context(|| format!("writing {}", results.display()))?;
    let old =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let new_readme = splice(&old, &block(&merged))?;
    std::fs::write(readme, new_readme).with_context(|| format!("writing {}", readme.display()))
}
