//! GitHub Actions output of a judged run, when `GITHUB_ACTIONS=true`: one `::error` workflow
//! command per failed or unjudged case (shown on the run's summary page), and a Markdown table
//! of every case appended to `$GITHUB_STEP_SUMMARY` when that file is given.
use std::fmt::Write as _;

use super::eval::{Outcome, Verdict};

/// The `::error` lines for the failed and unjudged cases. `file` is the expectation file, shown
/// as the annotation's location.
pub fn error_lines(outcome: &Outcome, file: &str) -> Vec<String> {
    outcome
        .problem_lines()
        .into_iter()
        .map(|line| {
            format!(
                "::error file={},title={}::{}",
                property(file),
                property("Mirrorball gate"),
                data(&line)
            )
        })
        .collect()
}

/// A Markdown table of every case, for the job summary.
pub fn summary_markdown(outcome: &Outcome, file: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Mirrorball gates (`{file}`): {} case(s), {} failed, {} not judged\n",
        outcome.cases.len(),
        outcome.failures(),
        outcome.errors()
    );
    md.push_str("| | VM | gate | measured | limits | |\n|---|---|---|---:|---|---|\n");
    for c in &outcome.cases {
        let (mark, why) = match &c.verdict {
            Verdict::Pass => ("✅", String::new()),
            Verdict::Fail(w) => ("❌", w.join("; ")),
            Verdict::Error(w) => ("⚠️", w.clone()),
        };
        let _ = writeln!(
            md,
            "| {mark} | {} | {} | {} | {} | {} |",
            cell(&c.vm),
            cell(&c.name),
            cell(c.measured.as_deref().unwrap_or("-")),
            cell(&c.limits),
            cell(&why)
        );
    }
    md
}

/// Escapes a workflow command's message.
fn data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escapes a workflow command's property value.
fn property(text: &str) -> String {
    data(text).replace(':', "%3A").replace(',', "%2C")
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::super::eval::Case;
    use super::*;

    #[test]
    fn errors_are_escaped_workflow_commands() {
        let outcome = Outcome {
            cases: vec![
                Case {
                    vm: "vm0".into(),
                    name: "exits".into(),
                    measured: Some("3".into()),
                    limits: "<= 2".into(),
                    verdict: Verdict::Fail(vec!["exits = 3, over by 1 (50.0%)".into()]),
                },
                Case {
                    vm: "vm0".into(),
                    name: "ok|".into(),
                    measured: None,
                    limits: String::new(),
                    verdict: Verdict::Pass,
                },
            ],
        };
        let lines = error_lines(&outcome, "gates/a,b.toml");
        assert_eq!(
            lines,
            [
                "::error file=gates/a%2Cb.toml,title=Mirrorball gate::gate failed: vm0: exits: \
              exits = 3, over by 1 (50.0%25)"
            ]
        );
        let md = summary_markdown(&outcome, "a.toml");
        assert!(md.contains("| ❌ | vm0 | exits | 3 | <= 2 |"), "{md}");
        assert!(md.contains("ok\\|"), "{md}");
    }
}
