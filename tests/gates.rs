//! End-to-end tests of gates (`vmm --expect`, `--junit`, `--baseline`) and `vmm diff`, on small
//! OS-less workload runs whose page faults are known: `work 4 R 100000 1` touches all 1,024
//! pages of its 4 MiB (100,000 uniform accesses leave a page untouched with probability e^-97).
//! Mistakes in the input files need no KVM: they are refused before any VM starts.
//!
//! JUnit reports are read back with a real consumer (Python's `junitparser`, installed by
//! `.ci/run`); without it those checks skip with the reason, except under CI.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{kvm_available, run_vmm, skip_or_fail, temp_file, text};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);
const TASK: &str = "work 4 R 100000 1";
const PAGES: u64 = 1024;
const EXIT_GATE_FAILED: i32 = 10;
const EXIT_GATE_INPUT: i32 = 11;
const EXIT_DIFF_REGRESSED: i32 = 12;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs the small workload with `extra` options.
fn run_small(extra: &[&str]) -> Output {
    let mut args = vec!["--workload", TASK];
    args.extend_from_slice(extra);
    run_vmm(&args, DEADLINE)
}

/// Runs the small workload under the gates of `toml`, writing a JUnit report; returns the
/// output and the report's path.
fn gated(test: &str, toml: &str, extra: &[&str]) -> (Output, PathBuf) {
    let expect = temp_file(test, "expect.toml", toml.as_bytes());
    let junit = expect.with_file_name("junit.xml");
    let _ = std::fs::remove_file(&junit);
    let mut args = vec!["--expect", path_str(&expect), "--junit", path_str(&junit)];
    args.extend_from_slice(extra);
    (run_small(&args), junit)
}

/// The cases of a JUnit report as a consumer reads them: (result, classname, name, message),
/// result being "passed", "Failure" or "Error". `None` (after printing why) when the consumer
/// is not installed outside CI.
fn junit_cases(test: &str, path: &Path) -> Option<Vec<(String, String, String, String)>> {
    const READER: &str = r#"
import sys, junitparser
xml = junitparser.JUnitXml.fromfile(sys.argv[1])
suites = [xml] if isinstance(xml, junitparser.TestSuite) else list(xml)
for suite in suites:
    for case in suite:
        res = [r for r in case.result if not isinstance(r, junitparser.Skipped)]
        kind = type(res[0]).__name__ if res else "passed"
        msg = (res[0].message or "") if res else ""
        print("\t".join([kind, case.classname, case.name, msg.replace("\t", " ")]))
"#;
    let out = match Command::new("python3")
        .args(["-c", READER, path_str(path)])
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            skip_or_fail(test, &format!("python3 is not available ({e})"));
            return None;
        }
    };
    if !out.status.success() {
        let err = text(&out.stderr);
        if err.contains("No module named 'junitparser'") {
            skip_or_fail(
                test,
                "Python's junitparser is not installed (pip install junitparser)",
            );
            return None;
        }
        panic!("junitparser could not read {}: {err}", path.display());
    }
    Some(
        text(&out.stdout)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.splitn(4, '\t').collect();
                let get = |i: usize| f.get(i).copied().unwrap_or("").to_string();
                (get(0), get(1), get(2), get(3))
            })
            .collect(),
    )
}

/// The structure every JUnit consumer relies on, checked without one: counts that match the
/// elements.
fn check_junit_counts(path: &Path, tests: usize, failures: usize, errors: usize) {
    let xml = std::fs::read_to_string(path).expect("junit report");
    assert!(xml.starts_with("<?xml version=\"1.0\""), "{xml}");
    assert_eq!(xml.matches("<testcase ").count(), tests, "{xml}");
    assert_eq!(xml.matches("<failure ").count(), failures, "{xml}");
    assert_eq!(xml.matches("<error ").count(), errors, "{xml}");
    assert!(
        xml.contains(&format!(
            "tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\""
        )),
        "{xml}"
    );
}

#[test]
fn a_passing_gate_exits_0_with_a_junit_report() {
    const TEST: &str = "a_passing_gate_exits_0_with_a_junit_report";
    if !kvm_available(TEST) {
        return;
    }
    let toml = format!(
        r#"
[[gate]]
name = "known first touches"
task = "{TASK}"
figure = "guest_minor_faults"
equals = {PAGES}
[[gate]]
figure = "guest_major_faults"
equals = 0
[[gate]]
task = 0
figure = "host_minor_faults"
min = {PAGES}
[[gate]]
figure = "pf_taken"
min = 1
[[gate]]
figure = "exits.mmio_write"
min = 3
max = 10
[[gate]]
task = "*"
figure = "iterations"
equals = 1
[[gate]]
figure = "lost_samples"
equals = 0
[[gate]]
figure = "run_time_s"
max = 100
"#
    );
    let (out, junit) = gated("gates-pass", &toml, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    assert!(
        err.contains("vmm: gates (") && err.contains("9 passed, 0 failed, 0 not judged"),
        "{err}"
    );
    check_junit_counts(&junit, 9, 0, 0);
    if let Some(cases) = junit_cases(TEST, &junit) {
        assert_eq!(cases.len(), 9, "{cases:?}");
        assert!(cases.iter().all(|c| c.0 == "passed"), "{cases:?}");
        assert!(cases.iter().all(|c| c.1 == "mirrorball.vm0"), "{cases:?}");
        assert!(
            cases
                .iter()
                .any(|c| c.2 == format!("known first touches [task 0: {TASK}]")),
            "{cases:?}"
        );
    }
}

#[test]
fn each_kind_of_gate_fails_with_exit_10_and_one_line() {
    const TEST: &str = "each_kind_of_gate_fails_with_exit_10_and_one_line";
    if !kvm_available(TEST) {
        return;
    }
    // (gate body, the violation line it must print)
    let kinds = [
        (
            format!("task = \"{TASK}\"\nfigure = \"guest_minor_faults\"\nmax = 1000"),
            "guest_minor_faults = 1024, limit <= 1000 (max): over by 24 (2.4%)".to_string(),
        ),
        (
            "figure = \"guest_major_faults\"\nmin = 1".into(),
            "guest_major_faults = 0, limit >= 1 (min): under by 1".into(),
        ),
        (
            "figure = \"host_minor_faults\"\nmax = 10".into(),
            "host_minor_faults = ".into(),
        ),
        (
            "figure = \"host_major_faults\"\nmin = 1".into(),
            "host_major_faults = 0, limit >= 1 (min)".into(),
        ),
        (
            "figure = \"pf_taken\"\nmax = 1".into(),
            "pf_taken = ".into(),
        ),
        (
            "figure = \"pf_fixed\"\nmax = 1".into(),
            "pf_fixed = ".into(),
        ),
        (
            "figure = \"exits.mmio_write\"\nequals = 1".into(),
            "exits.mmio_write = 3, limit = 1 (equals): over by 2 (200.0%)".into(),
        ),
        ("figure = \"exits\"\nmax = 1".into(), "exits = ".into()),
        (
            "task = 0\nfigure = \"cpu_time_s\"\nmin = 1000".into(),
            "cpu_time_s = ".into(),
        ),
        (
            "figure = \"run_time_s\"\nmax = 0".into(),
            "run_time_s = ".into(),
        ),
        (
            "figure = \"lost_samples\"\nmin = 1".into(),
            "lost_samples = 0, limit >= 1 (min): under by 1".into(),
        ),
    ];
    for (gate, line) in kinds {
        let (out, junit) = gated("gates-fail", &format!("[[gate]]\n{gate}\n"), &[]);
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(EXIT_GATE_FAILED),
            "{gate}: stderr: {err}"
        );
        let failed: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("vmm: gate failed: vm0: "))
            .collect();
        assert_eq!(failed.len(), 1, "{gate}: {err}");
        assert!(failed[0].contains(&line), "{gate}: {err}");
        assert!(failed[0].contains("limit"), "{gate}: {err}");
        assert!(err.contains("(exit code 10)"), "{err}");
        check_junit_counts(&junit, 2, 1, 0);
        if let Some(cases) = junit_cases(TEST, &junit) {
            assert_eq!(cases.len(), 2, "{cases:?}");
            assert_eq!(cases[0].0, "passed", "the VM ended cleanly: {cases:?}");
            assert_eq!(cases[1].0, "Failure", "{cases:?}");
            assert!(cases[1].3.contains(&line), "{cases:?}");
        }
    }
}

#[test]
fn baseline_relative_gates_pass_within_and_fail_beyond_the_tolerance() {
    const TEST: &str = "baseline_relative_gates_pass_within_and_fail_beyond_the_tolerance";
    if !kvm_available(TEST) {
        return;
    }
    let base = temp_file("gates-baseline", "base.json", b"");
    let out = run_small(&["--stats", path_str(&base)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let toml = format!(
        "baseline = \"base.json\"\n\
         [[gate]]\ntask = \"{TASK}\"\nfigure = \"guest_minor_faults\"\nmax_increase = 0\nmax_decrease = 0\n\
         [[gate]]\nfigure = \"host_minor_faults\"\nmax_increase = \"50%\"\n"
    );
    let expect = base.with_file_name("expect.toml");
    std::fs::write(&expect, &toml).expect("expect");
    let out = run_small(&["--expect", path_str(&expect)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // The same gates against a baseline whose task faulted 24 pages less: over by 24.
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&base).expect("base")).expect("j");
    doc["tasks"][0]["guest_min_flt"] = (PAGES - 24).into();
    let lower = base.with_file_name("lower.json");
    std::fs::write(&lower, doc.to_string()).expect("lower");
    let junit = base.with_file_name("junit.xml");
    let out = run_small(&[
        "--expect",
        path_str(&expect),
        "--baseline",
        path_str(&lower),
        "--junit",
        path_str(&junit),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_GATE_FAILED), "{err}");
    assert!(
        err.contains("guest_minor_faults = 1024, limit <= 1000 (baseline 1000 + 0): over by 24"),
        "{err}"
    );
    check_junit_counts(&junit, 3, 1, 0);
    if let Some(cases) = junit_cases(TEST, &junit) {
        assert_eq!(
            cases.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
            ["passed", "Failure", "passed"]
        );
    }
}

#[test]
fn unknown_tasks_and_vms_are_not_judged_exit_11() {
    const TEST: &str = "unknown_tasks_and_vms_are_not_judged_exit_11";
    if !kvm_available(TEST) {
        return;
    }
    let toml = "[[gate]]\ntask = \"work 8 R 1\"\nfigure = \"exits\"\nmax = 1000000\n\
                [[gate]]\nvm = \"db\"\nfigure = \"exits\"\nmax = 1000000\n";
    let (out, junit) = gated("gates-unknown", toml, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_GATE_INPUT), "{err}");
    assert!(
        err.contains(&format!(
            "vmm: gate not judged: vm0: exits: no task \"work 8 R 1\" in vm0 (tasks: \"{TASK}\")"
        )),
        "{err}"
    );
    assert!(
        err.contains("vmm: gate not judged: db exits: no VM named \"db\" in the run (VMs: vm0)"),
        "{err}"
    );
    check_junit_counts(&junit, 3, 0, 2);
    if let Some(cases) = junit_cases(TEST, &junit) {
        assert_eq!(cases[1].0, "Error", "{cases:?}");
        assert_eq!(cases[2].0, "Error", "{cases:?}");
    }
}

#[test]
fn github_actions_get_annotations_and_a_step_summary() {
    if !kvm_available("github_actions_get_annotations_and_a_step_summary") {
        return;
    }
    let expect = temp_file(
        "gates-github",
        "expect.toml",
        b"[[gate]]\nfigure = \"guest_minor_faults\"\nmax = 1000\n",
    );
    let summary = expect.with_file_name("summary.md");
    let _ = std::fs::remove_file(&summary);
    let out = Command::new(common::vmm_bin())
        .args(["--workload", TASK, "--expect", path_str(&expect)])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .output()
        .expect("vmm");
    assert_eq!(out.status.code(), Some(EXIT_GATE_FAILED));
    let stdout = text(&out.stdout);
    let annotation = format!(
        "::error file={},title=Mirrorball gate::gate failed: vm0: guest_minor_faults: \
         guest_minor_faults = 1024, limit <= 1000 (max): over by 24 (2.4%25)",
        path_str(&expect)
    );
    assert!(stdout.lines().any(|l| l == annotation), "{stdout}");
    let md = std::fs::read_to_string(&summary).expect("step summary");
    assert!(
        md.contains("| ❌ | vm0 | guest_minor_faults | 1024 | <= 1000 |"),
        "{md}"
    );
}

/// Mistakes in expectation files: one line, exit code 11, and no VM started.
#[test]
fn bad_expectation_files_are_one_line_before_the_vm_runs() {
    let dir = temp_file("gates-bad", "x", b"");
    let dir = dir.parent().expect("dir");
    let cases: [(&str, &str, &str); 8] = [
        ("syntax.toml", "[[gate]\nfigure = \"exits\"\n", "syntax.toml:1: "),
        (
            "key.toml",
            "[[gate]]\nfigure = \"exits\"\nmaximum = 3\n",
            "key.toml:3: unknown field `maximum`",
        ),
        (
            "figure.toml",
            "[[gate]]\nfigure = \"page_faults\"\nmax = 3\n",
            "figure.toml:2: unknown figure \"page_faults\"",
        ),
        (
            "reason.toml",
            "[[gate]]\nfigure = \"exits.bogus\"\nmax = 3\n",
            "reason.toml:2: unknown exit reason \"bogus\"",
        ),
        (
            "nolimit.toml",
            "[[gate]]\nfigure = \"exits\"\n",
            "nolimit.toml:1: the gate sets no limit",
        ),
        (
            "nobase.toml",
            "[[gate]]\nfigure = \"exits\"\nmax_increase = \"5%\"\n",
            "has a relative limit but no baseline is given",
        ),
        (
            "missing.toml",
            "baseline = \"no-such-base.json\"\n[[gate]]\nfigure = \"exits\"\nmax_increase = \"5%\"\n",
            "no-such-base.json: the baseline does not exist",
        ),
        (
            "badbase.toml",
            "baseline = \"badbase.toml\"\n[[gate]]\nfigure = \"exits\"\nmax_increase = \"5%\"\n",
            "badbase.toml: not JSON",
        ),
    ];
    for (name, body, needle) in cases {
        let path = dir.join(name);
        std::fs::write(&path, body).expect("write");
        let out = run_vmm(&["--workload", TASK, "--expect", path_str(&path)], DEADLINE);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_GATE_INPUT), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
        assert!(err.starts_with("vmm: gates: "), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(err.trim_end().ends_with("(exit code 11)"), "{name}: {err}");
        assert!(out.stdout.is_empty(), "{name}: no VM ran");
    }
    let out = run_vmm(
        &["--expect", path_str(&dir.join("does-not-exist.toml"))],
        DEADLINE,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_GATE_INPUT), "{err}");
    assert!(err.contains("cannot read it"), "{err}");
    let out = run_vmm(&["--junit", "/tmp/x.xml"], DEADLINE);
    assert_eq!(out.status.code(), Some(2), "--junit needs --expect");
}

/// `vmm diff` on two real --stats files, and on a copy with one figure moved.
#[test]
fn diff_of_real_stats_files() {
    if !kvm_available("diff_of_real_stats_files") {
        return;
    }
    let a = temp_file("gates-diff", "a.json", b"");
    let b = a.with_file_name("b.json");
    for p in [&a, &b] {
        let out = run_vmm(
            &[
                "--workload",
                TASK,
                "--workload",
                "work 2 L 1000 2",
                "--stats",
                path_str(p),
            ],
            DEADLINE,
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let diff = |base: &Path, new: &Path, extra: &[&str]| {
        let mut args = vec!["diff", path_str(base), path_str(new)];
        args.extend_from_slice(extra);
        run_vmm(&args, DEADLINE)
    };
    // Two runs, generous tolerance: every figure of the VM and of both tasks, and none of the
    // fault counts marked (a loaded machine may still move a sampler figure from 0 to a few).
    let out = diff(&a, &b, &["--tolerance", "1000%"]);
    let table = text(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | EXIT_DIFF_REGRESSED)),
        "{table}{}",
        text(&out.stderr)
    );
    for line in table.lines().filter(|l| l.contains("REGRESSED")) {
        let figure = line.split_whitespace().next().unwrap_or("");
        assert!(
            !figure.contains("faults") && !figure.starts_with("pf_"),
            "{line}\n{table}"
        );
    }
    for needle in [
        "== vm0\n",
        &format!("== vm0 / task 0: {TASK}\n"),
        "== vm0 / task 1: work 2 L 1000 2\n",
        "guest_minor_faults",
        "host_minor_faults",
        "pf_taken",
        "pf_fixed",
        "exits.mmio_write",
        "cpu_time_s",
        "run_time_s",
        "lost_samples",
    ] {
        assert!(table.contains(needle), "{needle}: {table}");
    }
    // The first task's guest faults are exact: equal in both runs under the default tolerance.
    let row = |table: &str, group: &str, figure: &str| -> String {
        let start = table.find(group).expect("group");
        table[start..]
            .lines()
            .find(|l| l.trim_start().starts_with(figure))
            .expect("row")
            .to_string()
    };
    let out = diff(&a, &b, &[]);
    let table = text(&out.stdout);
    let task0 = format!("== vm0 / task 0: {TASK}");
    let line = row(&table, &task0, "guest_minor_faults ");
    assert!(line.contains("1024") && line.contains("+0 "), "{line}");
    assert!(!line.contains("REGRESSED"), "{line}");

    // A baseline where task 0 faulted 24 pages less: the new run regressed, exit code 12.
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&a).expect("a")).expect("json");
    doc["tasks"][0]["guest_min_flt"] = (PAGES - 24).into();
    let lower = a.with_file_name("lower.json");
    std::fs::write(&lower, doc.to_string()).expect("lower");
    let out = diff(&lower, &a, &[]);
    let table = text(&out.stdout);
    assert_eq!(out.status.code(), Some(EXIT_DIFF_REGRESSED), "{table}");
    let line = row(&table, &task0, "guest_minor_faults ");
    assert!(
        line.contains("1000") && line.contains("+24") && line.contains("+2.4%"),
        "{line}"
    );
    assert!(line.ends_with("REGRESSED"), "{line}");
    let err = text(&out.stderr);
    assert!(
        err.contains("regressed") && err.contains("(exit code 12)"),
        "{err}"
    );
    // The other way round it improved: exit code 0.
    let out = diff(&a, &lower, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("improved"));
}

#[test]
fn diff_refuses_unusable_inputs_in_one_line() {
    let dir = temp_file("gates-diff-bad", "x", b"");
    let dir = dir.parent().expect("dir");
    let not_json = dir.join("not.json");
    std::fs::write(&not_json, "{").expect("w");
    let not_stats = dir.join("other.json");
    std::fs::write(&not_stats, "{\"a\": 1}").expect("w");
    for (base, needle) in [
        (dir.join("missing.json"), "missing.json: "),
        (not_json, "not JSON"),
        (not_stats, "is not a VM report"),
    ] {
        let other = base.clone();
        let out = run_vmm(&["diff", path_str(&base), path_str(&other)], DEADLINE);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_GATE_INPUT), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(err.lines().all(|l| l.starts_with("vmm: diff: ")), "{err}");
        assert!(out.stdout.is_empty());
    }
    let out = run_vmm(&["diff", "a.json"], DEADLINE);
    assert_eq!(out.status.code(), Some(2), "usage");
}
