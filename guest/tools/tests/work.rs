//! `work`: argument validation (exit status 2) and tiny runs whose own rusage shows the faults
//! of the pages they touched.

mod common;

use common::*;
use mirrorball_guest_tools::workmem::distinct_pages;
use mirrorball_workload::{AccessStream, Pattern};

const WORK: &str = env!("CARGO_BIN_EXE_work");

/// The `key=value` fields of the summary line.
fn field(summary: &str, key: &str) -> u64 {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {summary:?}"))
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn summary_line(out: &std::process::Output) -> String {
    let text = stdout(out);
    assert!(text.starts_with("work: pid "), "{text}");
    text.lines()
        .find(|l| l.contains(" done: "))
        .unwrap_or_else(|| panic!("no summary: {text}"))
        .to_owned()
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    for (args, needle) in [
        (&["0", "R", "100", "1"][..], "memory size"),
        (&["abc", "R", "100", "1"], "memory size"),
        (&["99999999", "R", "100", "1"], "memory size"),
        (&["1", "X", "100", "1"], "pattern"),
        (&["1", "RL", "100", "1"], "pattern"),
        (&["1", "R", "-3", "1"], "unknown option"),
        (&["1", "R", "zero", "1"], "access count"),
        (&["1", "R", "100", "0"], "iteration count"),
        (&["1", "R"], "expected 3 or 4 arguments"),
        (&["1", "R", "100", "1", "--sleep-ms"], "needs a value"),
    ] {
        let out = run(WORK, args, &[]);
        assert_one_line_error(&out, 2, needle);
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn tiny_run_reports_the_faults_of_its_pages() {
    let seed = 42;
    let out = run(WORK, &["1", "R", "100", "1", "--seed", "42"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary_line(&out);
    // The pages the accesses fall in, from the same generator: all resident afterwards, and
    // each cost at least one minor fault inside the loop.
    let len = 1 << 20;
    let touched = distinct_pages(AccessStream::new(Pattern::Random, len, seed), len, 100);
    assert!(touched > 50, "{touched}");
    assert_eq!(field(&s, "pages_touched"), touched as u64, "{s}");
    assert!(field(&s, "loop_min_flt") >= touched as u64, "{s}");
    assert!(field(&s, "min_flt") >= field(&s, "loop_min_flt"), "{s}");
    assert_eq!(field(&s, "iterations"), 1);
    assert!(s.contains(&format!("pid {}", out_pid(&out))), "{s}");
}

fn out_pid(out: &std::process::Output) -> u32 {
    let text = stdout(out);
    text.strip_prefix("work: pid ")
        .and_then(|t| t.split(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid: {text}"))
}

#[test]
fn locality_run_with_registration() {
    let dir = Scratch::new("work-reg");
    std::fs::write(dir.path("status"), "").unwrap();
    let out = run(
        WORK,
        &["2", "L", "5000", "3", "--sleep-ms", "10", "--register"],
        &[("MIRRORBALL_PROC_DIR", &dir.0)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary_line(&out);
    assert_eq!(field(&s, "iterations"), 3);
    // Locality: 15,000 accesses with steps below 300 bytes stay within a few hundred KiB.
    let touched = field(&s, "pages_touched");
    assert!((1..=512).contains(&touched), "{s}");
    assert!(field(&s, "loop_min_flt") >= touched, "{s}");
    let pid = out_pid(&out);
    assert_eq!(
        std::fs::read_to_string(dir.path("status")).unwrap(),
        format!("R {pid}\nU {pid}\n")
    );
}

#[test]
fn registration_without_driver_fails_in_one_line() {
    let dir = Scratch::new("work-absent");
    let out = run(
        WORK,
        &["1", "R", "10", "1", "--register"],
        &[("MIRRORBALL_PROC_DIR", &dir.0)],
    );
    assert_one_line_error(&out, 1, "is the mirrorball driver loaded?");
}
