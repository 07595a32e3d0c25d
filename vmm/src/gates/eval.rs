//! Judging a run: every gate against every VM (and task) it names, giving one [`Case`] each.
//!
//! Works on `--stats` JSON per VM ([`VmStats`]), so a single VM and a fleet are judged alike.
//! Besides the gates, each VM gets a case for how it ended (a non-zero end code fails it).
use super::expect::{Expectations, Gate, Tolerance};
use super::stats::{self, counterpart, Figure, VmStats};

/// What happened to one gate on one VM or task.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Every limit held.
    Pass,
    /// One line per limit that did not hold.
    Fail(Vec<String>),
    /// The gate could not be judged (unknown task or VM, figure not measured, no baseline
    /// value): why.
    Error(String),
}

/// One judged gate.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// The VM (empty when the gate named a VM that does not exist).
    pub vm: String,
    /// The gate's name, with the task it was applied to.
    pub name: String,
    /// The measured value, as text.
    pub measured: Option<String>,
    /// The limits, as text.
    pub limits: String,
    /// The verdict.
    pub verdict: Verdict,
}

/// All cases of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// In gate order; each VM's end case first.
    pub cases: Vec<Case>,
}

impl Outcome {
    /// Number of failed cases.
    pub fn failures(&self) -> usize {
        self.count(|v| matches!(v, Verdict::Fail(_)))
    }

    /// Number of cases that could not be judged.
    pub fn errors(&self) -> usize {
        self.count(|v| matches!(v, Verdict::Error(_)))
    }

    fn count(&self, f: impl Fn(&Verdict) -> bool) -> usize {
        self.cases.iter().filter(|c| f(&c.verdict)).count()
    }

    /// One line per failed or unjudged case and limit.
    pub fn problem_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for c in &self.cases {
            let who = if c.vm.is_empty() {
                c.name.clone()
            } else {
                format!("{}: {}", c.vm, c.name)
            };
            match &c.verdict {
                Verdict::Pass => {}
                Verdict::Fail(why) => {
                    lines.extend(why.iter().map(|w| format!("gate failed: {who}: {w}")))
                }
                Verdict::Error(why) => lines.push(format!("gate not judged: {who}: {why}")),
            }
        }
        lines
    }
}

/// Judges `run` against `exp`; `baseline` is the baseline's VMs, if the file has one.
pub fn evaluate(exp: &Expectations, run: &[VmStats], baseline: Option<&[VmStats]>) -> Outcome {
    let mut cases: Vec<Case> = run.iter().map(end_case).collect();
    for gate in &exp.gates {
        let vms: Vec<&VmStats> = run
            .iter()
            .filter(|vm| gate.vm.as_ref().is_none_or(|name| *name == vm.name))
            .collect();
        if vms.is_empty() {
            let known: Vec<&str> = run.iter().map(|v| v.name.as_str()).collect();
            cases.push(Case {
                vm: String::new(),
                name: gate.name.clone(),
                measured: None,
                limits: limits_text(gate, None),
                verdict: Verdict::Error(format!(
                    "no VM named {:?} in the run (VMs: {})",
                    gate.vm.as_deref().unwrap_or(""),
                    known.join(", ")
                )),
            });
            continue;
        }
        for vm in vms {
            let base_vm = baseline.and_then(|b| counterpart(vm, run.len(), b));
            cases.extend(judge_vm(gate, vm, base_vm, baseline.is_some()));
        }
    }
    Outcome { cases }
}

fn end_case(vm: &VmStats) -> Case {
    let code = vm
        .doc
        .pointer("/end/exit_code")
        .and_then(serde_json::Value::as_i64);
    let message = vm
        .doc
        .pointer("/end/message")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("?");
    let verdict = match code {
        Some(0) => Verdict::Pass,
        Some(c) => Verdict::Fail(vec![format!("the VM ended with code {c}: {message}")]),
        None => Verdict::Error("the report does not say how the VM ended".into()),
    };
    Case {
        vm: vm.name.clone(),
        name: "ended cleanly".into(),
        measured: code.map(|c| format!("exit code {c}")),
        limits: "exit code 0".into(),
        verdict,
    }
}

/// The cases of `gate` on one VM: one for the VM, or one per selected task.
fn judge_vm(
    gate: &Gate,
    vm: &VmStats,
    base_vm: Option<&VmStats>,
    have_baseline: bool,
) -> Vec<Case> {
    let case = |name: String, measured: Result<f64, String>, base: Option<Result<f64, String>>| {
        judge_value(gate, vm.name.clone(), name, measured, base)
    };
    let no_base_vm = || {
        format!(
            "the baseline has no VM named {:?} (and is not a single VM to compare with)",
            vm.name
        )
    };
    let Some(selector) = &gate.task else {
        let base = have_baseline
            .then(|| base_vm.map_or_else(|| Err(no_base_vm()), |b| gate.figure.of_vm(&b.doc)));
        return vec![case(gate.name.clone(), gate.figure.of_vm(&vm.doc), base)];
    };
    let tasks = stats::tasks(&vm.doc);
    let mut out = Vec::new();
    for task in tasks {
        let (index, spec) = stats::task_label(task);
        if !selector.matches(index, spec) {
            continue;
        }
        let label = match index {
            Some(i) => format!("{} [task {i}: {spec}]", gate.name),
            None => format!("{} [task {spec}]", gate.name),
        };
        let base = have_baseline.then(|| {
            let b = base_vm.ok_or_else(no_base_vm)?;
            let bt = stats::tasks(&b.doc)
                .iter()
                .find(|t| stats::task_label(t) == (index, spec))
                .ok_or_else(|| format!("the baseline's {} has no task {spec:?}", b.name))?;
            gate.figure.of_task(bt)
        });
        out.push(case(label, gate.figure.of_task(task), base));
    }
    if out.is_empty() {
        let known: Vec<String> = tasks
            .iter()
            .map(|t| format!("{:?}", stats::task_label(t).1))
            .collect();
        out.push(Case {
            vm: vm.name.clone(),
            name: gate.name.clone(),
            measured: None,
            limits: limits_text(gate, None),
            verdict: Verdict::Error(if known.is_empty() {
                format!("no task {selector} in {}: it has no tasks", vm.name)
            } else {
                format!(
                    "no task {selector} in {} (tasks: {})",
                    vm.name,
                    known.join(", ")
                )
            }),
        });
    }
    out
}

fn judge_value(
    gate: &Gate,
    vm: String,
    name: String,
    measured: Result<f64, String>,
    base: Option<Result<f64, String>>,
) -> Case {
    let fig = &gate.figure;
    let base_value = match &base {
        Some(Ok(b)) => Some(*b),
        _ => None,
    };
    let limits = limits_text(gate, base_value);
    let mut case = Case {
        vm,
        name,
        measured: None,
        limits,
        verdict: Verdict::Pass,
    };
    let value = match measured {
        Ok(v) => v,
        Err(e) => {
            case.verdict = Verdict::Error(format!("{fig} not measured: {e}"));
            return case;
        }
    };
    case.measured = Some(fig.show(value));
    let mut why = Vec::new();
    let exact = gate.min.is_some() && gate.min == gate.max;
    let (max_name, min_name) = if exact {
        ("equals", "equals")
    } else {
        ("max", "min")
    };
    if let Some(max) = gate.max {
        if value > max {
            why.push(over(fig, max_name, max, value));
        }
    }
    if let Some(min) = gate.min {
        if value < min {
            why.push(under(fig, min_name, min, value));
        }
    }
    if gate.is_relative() {
        let b = match base {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                case.verdict = Verdict::Error(format!("no baseline value for {fig}: {e}"));
                return case;
            }
            None => {
                case.verdict = Verdict::Error("no baseline given".into());
                return case;
            }
        };
        if let Some(t) = gate.max_increase {
            let limit = b + t.amount(b);
            if value > limit {
                why.push(over(fig, &relative("+", t, b, fig), limit, value));
            }
        }
        if let Some(t) = gate.max_decrease {
            let limit = b - t.amount(b);
            if value < limit {
                why.push(under(fig, &relative("-", t, b, fig), limit, value));
            }
        }
    }
    if !why.is_empty() {
        case.verdict = Verdict::Fail(why);
    }
    case
}

fn relative(sign: &str, t: Tolerance, base: f64, fig: &Figure) -> String {
    format!("baseline {} {sign} {t}", fig.show(base))
}

fn over(fig: &Figure, what: &str, limit: f64, value: f64) -> String {
    let op = if what == "equals" { "=" } else { "<=" };
    format!(
        "{fig} = {}, limit {op} {} ({what}): over by {}{}",
        fig.show(value),
        fig.show(limit),
        fig.show(value - limit),
        percent_of(value - limit, limit)
    )
}

fn under(fig: &Figure, what: &str, limit: f64, value: f64) -> String {
    let op = if what == "equals" { "=" } else { ">=" };
    format!(
        "{fig} = {}, limit {op} {} ({what}): under by {}{}",
        fig.show(value),
        fig.show(limit),
        fig.show(limit - value),
        percent_of(limit - value, limit)
    )
}

fn percent_of(delta: f64, of: f64) -> String {
    if of == 0.0 {
        String::new()
    } else {
        format!(" ({:.1}%)", 100.0 * delta / of.abs())
    }
}

/// The gate's limits as text, with the baseline value when known.
fn limits_text(gate: &Gate, base: Option<f64>) -> String {
    let fig = &gate.figure;
    let mut parts = Vec::new();
    match (gate.min, gate.max) {
        (Some(lo), Some(hi)) if lo == hi => parts.push(format!("= {}", fig.show(lo))),
        (lo, hi) => {
            if let Some(lo) = lo {
                parts.push(format!(">= {}", fig.show(lo)));
            }
            if let Some(hi) = hi {
                parts.push(format!("<= {}", fig.show(hi)));
            }
        }
    }
    let base_text = base.map_or_else(|| "baseline".to_string(), |b| fig.show(b));
    if let Some(t) = gate.max_increase {
        parts.push(format!("<= {base_text} + {t}"));
    }
    if let Some(t) = gate.max_decrease {
        parts.push(format!(">= {base_text} - {t}"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::expect::parse;
    use super::super::stats::vms_of;
    use super::*;
    use serde_json::json;

    fn run() -> Vec<VmStats> {
        let doc = json!({
            "end": {"kind": "workload_finished", "message": "workload finished", "exit_code": 0},
            "elapsed_ns": 1_000_000_000u64,
            "vcpus": [{"index": 0, "exits": {"mmio_write": 10}, "total_exits": 10,
                       "host_minor_faults": 300, "host_major_faults": 0, "user_ns": 0,
                       "system_ns": 0, "kvm_stats": {"pf_taken": 290, "exits": 10}}],
            "tasks": [{"task": 0, "spec": "work 1 R 10", "guest_min_flt": 256,
                       "host": {"host_min_flt": 299, "host_maj_flt": 0, "pf_taken": 280,
                                "exits": 9, "vcpu_cpu_ns": 5, "samples": 3},
                       "iterations": 20, "elapsed_ns": 900_000_000u64}]
        });
        vms_of(doc).expect("vms")
    }

    fn judge(text: &str, baseline: Option<&[VmStats]>) -> Outcome {
        evaluate(&parse(text, "t.toml").expect("parses"), &run(), baseline)
    }

    #[test]
    fn absolute_limits_pass_and_fail_with_the_amount() {
        let o = judge(
            "[[gate]]\ntask = \"work 1 R 10\"\nfigure = \"guest_minor_faults\"\nequals = 256\n\
             [[gate]]\nfigure = \"host_minor_faults\"\nmax = 250\n\
             [[gate]]\nfigure = \"exits.mmio_write\"\nmin = 11\n",
            None,
        );
        assert_eq!(o.cases.len(), 4, "{o:?}");
        assert_eq!(o.cases[0].verdict, Verdict::Pass, "the VM ended cleanly");
        assert_eq!(o.cases[1].verdict, Verdict::Pass);
        assert_eq!(o.cases[1].measured.as_deref(), Some("256"));
        assert_eq!(
            o.cases[2].verdict,
            Verdict::Fail(vec![
                "host_minor_faults = 300, limit <= 250 (max): over by 50 (20.0%)".into()
            ])
        );
        assert_eq!(
            o.cases[3].verdict,
            Verdict::Fail(vec![
                "exits.mmio_write = 10, limit >= 11 (min): under by 1 (9.1%)".into()
            ])
        );
        assert_eq!((o.failures(), o.errors()), (2, 0));
        assert_eq!(o.problem_lines().len(), 2);
        assert!(o.problem_lines()[0].starts_with("gate failed: vm0: host_minor_faults: "));
    }

    #[test]
    fn relative_limits_use_the_baseline() {
        let mut base = run();
        base[0].doc["vcpus"][0]["kvm_stats"]["exits"] = json!(9);
        base[0].doc["tasks"][0]["host"]["pf_taken"] = json!(300);
        let o = judge(
            "[[gate]]\nfigure = \"exits\"\nmax_increase = \"20%\"\n\
             [[gate]]\nfigure = \"exits\"\nmax_increase = 0\n\
             [[gate]]\ntask = 0\nfigure = \"pf_taken\"\nmax_decrease = \"5%\"\n",
            Some(&base),
        );
        assert_eq!(o.cases[1].verdict, Verdict::Pass, "10 <= 9 + 20%: {o:?}");
        let Verdict::Fail(why) = &o.cases[2].verdict else {
            panic!("{o:?}");
        };
        assert_eq!(
            why[0],
            "exits = 10, limit <= 9 (baseline 9 + 0): over by 1 (11.1%)"
        );
        assert!(matches!(&o.cases[3].verdict, Verdict::Fail(w) if w[0].contains("under by 5")));
        assert_eq!(o.cases[3].limits, ">= 300 - 5%");
    }

    #[test]
    fn unknown_tasks_vms_and_unmeasured_figures_are_errors() {
        let o = judge(
            "[[gate]]\ntask = \"work 2 R 10\"\nfigure = \"exits\"\nmax = 1\n\
             [[gate]]\nvm = \"db\"\nfigure = \"exits\"\nmax = 1\n\
             [[gate]]\nfigure = \"lost_samples\"\nmax = 0\n\
             [[gate]]\nfigure = \"exits\"\nmax_increase = 1\n",
            None,
        );
        let errors: Vec<&str> = o
            .cases
            .iter()
            .filter_map(|c| match &c.verdict {
                Verdict::Error(e) => Some(e.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(errors.len(), 4, "{o:?}");
        assert!(errors[0].contains("no task \"work 2 R 10\" in vm0 (tasks: \"work 1 R 10\")"));
        assert!(errors[1].contains("no VM named \"db\""));
        assert!(errors[2].contains("lost_samples not measured"));
        assert!(errors[3].contains("no baseline"));
        let mut other = run();
        other[0].doc["vm"] = json!("a");
        let mut two = run();
        two.push(VmStats {
            name: "b".into(),
            doc: two[0].doc.clone(),
        });
        let exp = parse("[[gate]]\nfigure = \"exits\"\nmax_increase = 1\n", "t").expect("p");
        let o = evaluate(&exp, &two, Some(&vms_of(other[0].doc.clone()).expect("v")));
        assert!(matches!(&o.cases[2].verdict, Verdict::Error(e) if e.contains("no VM named")));
    }

    #[test]
    fn a_vm_that_ended_badly_fails_its_end_case() {
        let mut vms = run();
        vms[0].doc["end"] =
            json!({"kind": "timeout", "message": "timeout after 1 s", "exit_code": 7});
        let exp = parse("[[gate]]\nfigure = \"exits\"\nmax = 100\n", "t").expect("p");
        let o = evaluate(&exp, &vms, None);
        assert!(matches!(&o.cases[0].verdict, Verdict::Fail(w) if w[0].contains("code 7")));
        assert_eq!(o.cases[1].verdict, Verdict::Pass);
    }
}
