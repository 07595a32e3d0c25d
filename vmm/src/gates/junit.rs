//! The JUnit XML report of a judged run (`--junit PATH`): one `<testcase>` per case, a failed
//! limit as `<failure>`, a gate that could not be judged as `<error>`, in the format CI systems
//! (GitHub test reporters, GitLab, Jenkins) read.
use std::fmt::Write as _;

use super::eval::{Outcome, Verdict};

/// The report as XML text. `suite` names the test suite (e.g. the expectation file).
pub fn render(outcome: &Outcome, suite: &str, run_time_s: f64) -> String {
    let tests = outcome.cases.len();
    let (failures, errors) = (outcome.failures(), outcome.errors());
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"mirrorball gates\" tests=\"{tests}\" failures=\"{failures}\" \
         errors=\"{errors}\" time=\"{run_time_s:.3}\">"
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" \
         skipped=\"0\" time=\"{run_time_s:.3}\">",
        escape(suite)
    );
    for c in &outcome.cases {
        let class = if c.vm.is_empty() {
            "mirrorball".to_string()
        } else {
            format!("mirrorball.{}", c.vm)
        };
        let _ = write!(
            x,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"0\">",
            escape(&class),
            escape(&c.name)
        );
        let detail = format!(
            "measured: {}\nlimits: {}",
            c.measured.as_deref().unwrap_or("-"),
            c.limits
        );
        match &c.verdict {
            Verdict::Pass => {
                let _ = write!(x, "<system-out>{}</system-out>", escape(&detail));
            }
            Verdict::Fail(why) => {
                let _ = write!(
                    x,
                    "\n      <failure type=\"gate\" message=\"{}\">{}</failure>\n    ",
                    escape(&why.join("; ")),
                    escape(&format!("{}\n{detail}", why.join("\n")))
                );
            }
            Verdict::Error(why) => {
                let _ = write!(
                    x,
                    "\n      <error type=\"gate\" message=\"{}\">{}</error>\n    ",
                    escape(why),
                    escape(&detail)
                );
            }
        }
        x.push_str("</testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// Escapes text for XML attributes and content; drops characters XML 1.0 cannot carry.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::eval::Case;
    use super::*;

    #[test]
    fn counts_and_escapes() {
        let outcome = Outcome {
            cases: vec![
                Case {
                    vm: "vm0".into(),
                    name: "a <b> & \"c\"".into(),
                    measured: Some("1".into()),
                    limits: "<= 2".into(),
                    verdict: Verdict::Pass,
                },
                Case {
                    vm: "vm0".into(),
                    name: "exits".into(),
                    measured: Some("3".into()),
                    limits: "<= 2".into(),
                    verdict: Verdict::Fail(vec!["over by 1".into()]),
                },
                Case {
                    vm: String::new(),
                    name: "x\u{1}".into(),
                    measured: None,
                    limits: String::new(),
                    verdict: Verdict::Error("no VM".into()),
                },
            ],
        };
        let xml = render(&outcome, "g.toml", 1.5);
        assert!(
            xml.contains("tests=\"3\" failures=\"1\" errors=\"1\""),
            "{xml}"
        );
        assert!(
            xml.contains("name=\"a &lt;b&gt; &amp; &quot;c&quot;\""),
            "{xml}"
        );
        assert!(
            xml.contains("<failure type=\"gate\" message=\"over by 1\">"),
            "{xml}"
        );
        assert!(
            xml.contains("<error type=\"gate\" message=\"no VM\">"),
            "{xml}"
        );
        assert!(xml.contains("classname=\"mirrorball\" name=\"x\""), "{xml}");
        assert_eq!(xml.matches("<testcase ").count(), 3);
        assert_eq!(xml.matches("</testcase>").count(), 3);
    }
}
