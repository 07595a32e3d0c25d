//! Expectation files (`vmm --expect FILE.toml`): parsing and checking before the VM runs.
//!
//! ```toml
//! baseline = "base.json"        # optional: a --stats file for relative gates (relative to this file)
//!
//! [[gate]]
//! name = "random task faults"   # optional; a name is derived from the gate otherwise
//! vm = "vm0"                    # optional: every VM when absent
//! task = "work 64 R 100000"     # optional: a task spec, a task index, or "*" (each task)
//! figure = "guest_minor_faults" # see `stats::FIXED_FIGURES`, `exits.<reason>`, `kvm.<stat>`
//! equals = 16384                # absolute: equals, or min and/or max
//! max_increase = "10%"          # relative to the baseline: a percentage or an amount
//! max_decrease = "10%"
//! ```
//!
//! Unknown keys, unknown figures, a figure not measured at the gate's level (per VM or per
//! task), contradictory limits and relative limits without a baseline are refused here, with
//! the file and line, before any VM starts.
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::stats::Figure;
use super::GateError;

/// A parsed expectation file.
#[derive(Clone, Debug, PartialEq)]
pub struct Expectations {
    /// The baseline `--stats` file, resolved against the file's directory.
    pub baseline: Option<PathBuf>,
    /// The gates, in file order.
    pub gates: Vec<Gate>,
}

/// One gate: a figure of some VMs (or of their tasks) and the limits it must keep.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    /// Its name in reports.
    pub name: String,
    /// The VM it applies to (`None`: every VM).
    pub vm: Option<String>,
    /// The tasks it applies to (`None`: the VM as a whole).
    pub task: Option<TaskSelector>,
    /// What is measured.
    pub figure: Figure,
    /// Absolute lower bound (inclusive).
    pub min: Option<f64>,
    /// Absolute upper bound (inclusive).
    pub max: Option<f64>,
    /// How far above the baseline's value the figure may go.
    pub max_increase: Option<Tolerance>,
    /// How far below the baseline's value the figure may go.
    pub max_decrease: Option<Tolerance>,
}

impl Gate {
    /// Whether the gate needs a baseline.
    pub fn is_relative(&self) -> bool {
        self.max_increase.is_some() || self.max_decrease.is_some()
    }
}

/// Which tasks of a VM a gate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskSelector {
    /// Every task, each judged on its own.
    Each,
    /// The task with this index.
    Index(u64),
    /// Every task with this `work` spec (words compared with single spaces).
    Spec(String),
}

impl TaskSelector {
    /// Whether `task` (an entry of a report's `tasks`) is selected.
    pub fn matches(&self, index: Option<u64>, spec: &str) -> bool {
        match self {
            Self::Each => true,
            Self::Index(i) => index == Some(*i),
            Self::Spec(s) => normalize(spec) == *s,
        }
    }
}

impl fmt::Display for TaskSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Each => f.write_str("*"),
            Self::Index(i) => write!(f, "#{i}"),
            Self::Spec(s) => write!(f, "{s:?}"),
        }
    }
}

fn normalize(spec: &str) -> String {
    spec.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A tolerance around a baseline value: a fraction of it, or an amount in the figure's unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tolerance {
    /// A percentage of the baseline value.
    Percent(f64),
    /// An amount (counts, or seconds for times).
    Amount(f64),
}

impl Tolerance {
    /// Parses "10%", "2.5 %" or a plain amount "100".
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (number, percent) = match t.strip_suffix('%') {
            Some(n) => (n.trim(), true),
            None => (t, false),
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a tolerance (e.g. \"10%\" or 100)"))?;
        if !value.is_finite() || value < 0.0 {
            return Err(format!("tolerance {text:?} must be a number >= 0"));
        }
        Ok(if percent {
            Self::Percent(value)
        } else {
            Self::Amount(value)
        })
    }

    /// The allowed distance from `base`.
    pub fn amount(&self, base: f64) -> f64 {
        match *self {
            Self::Percent(p) => base.abs() * p / 100.0,
            Self::Amount(a) => a,
        }
    }
}

impl fmt::Display for Tolerance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Percent(p) => write!(f, "{p}%"),
            Self::Amount(a) => write!(f, "{a}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    baseline: Option<PathBuf>,
    #[serde(default)]
    gate: Vec<toml::Spanned<GateDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GateDoc {
    name: Option<String>,
    vm: Option<String>,
    task: Option<TaskDoc>,
    figure: toml::Spanned<String>,
    min: Option<f64>,
    max: Option<f64>,
    equals: Option<f64>,
    max_increase: Option<TolDoc>,
    max_decrease: Option<TolDoc>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TaskDoc {
    Index(u64),
    Spec(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TolDoc {
    Amount(f64),
    Text(String),
}

impl TolDoc {
    fn resolve(self) -> Result<Tolerance, String> {
        match self {
            Self::Amount(a) => Tolerance::parse(&a.to_string()),
            Self::Text(t) => Tolerance::parse(&t),
        }
    }
}

/// Reads and checks an expectation file. `baseline_override` (`--baseline`) replaces the
/// file's own baseline.
pub fn load(path: &Path, baseline_override: Option<&Path>) -> Result<Expectations, GateError> {
    let text = std::fs::read_to_string(path).map_err(|e| GateError::Expect {
        at: path.display().to_string(),
        problem: format!("cannot read it: {e}"),
    })?;
    let mut exp = parse(&text, &path.display().to_string())?;
    if let Some(base) = &exp.baseline {
        if base.is_relative() {
            let dir = path.parent().unwrap_or(Path::new("."));
            exp.baseline = Some(dir.join(base));
        }
    }
    if let Some(b) = baseline_override {
        exp.baseline = Some(b.to_path_buf());
    }
    if let Some(g) = exp.gates.iter().find(|g| g.is_relative()) {
        match &exp.baseline {
            None => {
                return Err(GateError::Expect {
                    at: path.display().to_string(),
                    problem: format!(
                        "gate {:?} has a relative limit but no baseline is given (`baseline = \
                         \"FILE.json\"` in the file, or --baseline)",
                        g.name
                    ),
                })
            }
            Some(b) if !b.is_file() => {
                return Err(GateError::Stats {
                    path: b.display().to_string(),
                    problem: "the baseline does not exist".into(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(exp)
}

/// Parses the text of an expectation file; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Expectations, GateError> {
    let at = |span: Option<std::ops::Range<usize>>| match span {
        Some(s) => format!("{origin}:{}", line_of(text, s.start)),
        None => origin.to_string(),
    };
    let doc: FileDoc = toml::from_str(text).map_err(|e| GateError::Expect {
        at: at(e.span()),
        problem: e.message().trim().replace('\n', " "),
    })?;
    if doc.gate.is_empty() {
        return Err(GateError::Expect {
            at: origin.to_string(),
            problem: "no [[gate]] in the file".into(),
        });
    }
    let mut gates = Vec::with_capacity(doc.gate.len());
    for spanned in doc.gate {
        let span = spanned.span();
        let g = spanned.into_inner();
        let fail = |problem: String| GateError::Expect {
            at: at(Some(span.clone())),
            problem,
        };
        let figure = Figure::parse(g.figure.get_ref()).map_err(|p| GateError::Expect {
            at: at(Some(g.figure.span())),
            problem: p,
        })?;
        let task = match g.task {
            None => None,
            Some(TaskDoc::Index(i)) => Some(TaskSelector::Index(i)),
            Some(TaskDoc::Spec(s)) if s.trim() == "*" => Some(TaskSelector::Each),
            Some(TaskDoc::Spec(s)) if s.trim().is_empty() => {
                return Err(fail("`task` is empty".into()))
            }
            Some(TaskDoc::Spec(s)) => Some(TaskSelector::Spec(normalize(&s))),
        };
        if task.is_some() && !figure.per_task() {
            return Err(fail(format!(
                "{figure} is measured per VM, not per task (drop `task`)"
            )));
        }
        if task.is_none() && !figure.per_vm() {
            return Err(fail(format!(
                "{figure} is measured per task: name a `task`"
            )));
        }
        let (mut min, mut max) = (g.min, g.max);
        if let Some(e) = g.equals {
            if min.is_some() || max.is_some() {
                return Err(fail("`equals` does not combine with `min`/`max`".into()));
            }
            (min, max) = (Some(e), Some(e));
        }
        for v in [min, max].into_iter().flatten() {
            if !v.is_finite() {
                return Err(fail(format!("limit {v} is not a finite number")));
            }
        }
        if let (Some(lo), Some(hi)) = (min, max) {
            if lo > hi {
                return Err(fail(format!("`min` {lo} is above `max` {hi}")));
            }
        }
        let max_increase = g
            .max_increase
            .map(TolDoc::resolve)
            .transpose()
            .map_err(fail)?;
        let max_decrease = g
            .max_decrease
            .map(TolDoc::resolve)
            .transpose()
            .map_err(fail)?;
        if min.is_none() && max.is_none() && max_increase.is_none() && max_decrease.is_none() {
            return Err(fail(
                "the gate sets no limit (equals, min, max, max_increase or max_decrease)".into(),
            ));
        }
        let name = g.name.unwrap_or_else(|| {
            let mut n = String::new();
            if let Some(vm) = &g.vm {
                n.push_str(vm);
                n.push(' ');
            }
            n.push_str(&figure.to_string());
            n
        });
        gates.push(Gate {
            name,
            vm: g.vm,
            task,
            figure,
            min,
            max,
            max_increase,
            max_decrease,
        });
    }
    Ok(Expectations {
        baseline: doc.baseline,
        gates,
    })
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, "x.toml").expect_err(text).to_string()
    }

    #[test]
    fn a_full_file_parses() {
        let exp = parse(
            r#"
baseline = "b.json"
[[gate]]
task = "work  64 R 100000"
figure = "guest_minor_faults"
equals = 16384
[[gate]]
name = "exits"
vm = "vm0"
figure = "exits.mmio_write"
max = 100
max_increase = "10%"
max_decrease = 5
[[gate]]
task = 1
figure = "cpu_time_s"
max = 2.5
[[gate]]
task = "*"
figure = "guest_major_faults"
max = 0
"#,
            "x.toml",
        )
        .expect("parses");
        assert_eq!(exp.baseline, Some(PathBuf::from("b.json")));
        assert_eq!(exp.gates.len(), 4);
        let g = &exp.gates[0];
        assert_eq!(g.task, Some(TaskSelector::Spec("work 64 R 100000".into())));
        assert_eq!((g.min, g.max), (Some(16384.0), Some(16384.0)));
        assert_eq!(g.name, "guest_minor_faults");
        let g = &exp.gates[1];
        assert_eq!(g.name, "exits");
        assert_eq!(exp.gates[2].name, "cpu_time_s");
        assert_eq!(g.max_increase, Some(Tolerance::Percent(10.0)));
        assert_eq!(g.max_decrease, Some(Tolerance::Amount(5.0)));
        assert!(g.is_relative());
        assert_eq!(exp.gates[2].task, Some(TaskSelector::Index(1)));
        assert_eq!(exp.gates[3].task, Some(TaskSelector::Each));
        assert!(TaskSelector::Spec("work 1 R 1".into()).matches(None, " work 1  R 1"));
    }

    #[test]
    fn mistakes_are_one_line_with_the_line_number() {
        let cases = [
            (
                "[[gate]]\nfigure = \"exits\"\nmax = 1\nmaxx = 2\n",
                "unknown field",
                ":",
            ),
            (
                "[[gate]]\nfigure = \"exit\"\nmax = 1\n",
                "unknown figure \"exit\"",
                ":2",
            ),
            ("[[gate]]\nfigure = \"exits\"\n", "sets no limit", ":1"),
            ("[[gate]]\nfigure = \"exits\"\nmax = \"x\"\n", "", ":3"),
            (
                "[[gate]]\nfigure = \"pf_fixed\"\ntask = 0\nmax = 1\n",
                "per VM",
                ":1",
            ),
            (
                "[[gate]]\nfigure = \"samples\"\nmax = 1\n",
                "per task",
                ":1",
            ),
            (
                "[[gate]]\nfigure = \"exits\"\nequals = 1\nmax = 2\n",
                "equals",
                ":1",
            ),
            (
                "[[gate]]\nfigure = \"exits\"\nmin = 3\nmax = 2\n",
                "above",
                ":1",
            ),
            (
                "[[gate]]\nfigure = \"exits\"\nmax_increase = \"ten%\"\n",
                "tolerance",
                ":1",
            ),
            (
                "[[gate]]\nfigure = \"exits\"\nmax_increase = -1\n",
                ">= 0",
                ":1",
            ),
            ("gate = [\n", "", ":"),
            ("baseline = \"b\"\n", "no [[gate]]", ""),
        ];
        for (text, needle, at) in cases {
            let e = err(text);
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(e.contains(&format!("x.toml{at}")), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_repository_gate_files_parse() {
        let exp = parse(
            include_str!("../../../resources/gates/default-workload.toml"),
            "default-workload.toml",
        )
        .expect("resources/gates/default-workload.toml");
        assert!(exp.gates.len() >= 10);
        assert!(
            exp.baseline.is_none(),
            "absolute: it runs on PVM and on VT-x/AMD-V"
        );
    }

    #[test]
    fn tolerances() {
        assert_eq!(Tolerance::parse("10%"), Ok(Tolerance::Percent(10.0)));
        assert_eq!(Tolerance::parse(" 2.5 %"), Ok(Tolerance::Percent(2.5)));
        assert_eq!(Tolerance::parse("100"), Ok(Tolerance::Amount(100.0)));
        assert!(Tolerance::parse("x").is_err());
        assert!(Tolerance::parse("NaN%").is_err());
        assert_eq!(Tolerance::Percent(10.0).amount(-200.0), 20.0);
    }
}
