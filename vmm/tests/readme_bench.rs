//! The README's benchmark table is generated (issue 8 §9): its block between the `vmm_bench`
//! markers must be exactly what the stored results (`vmm/benches/results.json`, written by
//! `cargo bench -p vmm --bench vmm_bench -- --update-readme`) render to.
#[allow(dead_code)]
#[path = "../benches/vmm_bench/readme.rs"]
mod readme;
#[allow(dead_code)]
#[path = "../benches/vmm_bench/report.rs"]
mod report;

use std::path::Path;

#[test]
fn the_readme_table_is_what_the_stored_bench_results_render_to() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rows = readme::load(&root.join("benches/results.json")).expect("stored results");
    assert!(!rows.is_empty(), "vmm/benches/results.json holds no rows");
    let text = std::fs::read_to_string(root.join("../README.md")).expect("README");
    let current = readme::current_block(&text).expect("the README has the generated block");
    assert_eq!(
        current,
        readme::block(&rows),
        "README.md's benchmark table was edited by hand or is stale: run \
         `cargo bench -p vmm --bench vmm_bench -- --update-readme`"
    );
}

#[test]
fn merging_replaces_the_groups_that_ran_and_keeps_the_others() {
    let row = |group: u8, id: &str, ours: f64| readme::StoredRow {
        group,
        id: id.into(),
        benchmark: id.into(),
        unit: "ms".into(),
        ours: Some(ours),
        baseline_name: String::new(),
        baseline: None,
        ratio: None,
        target: report::Target::None,
        verdict: "info".into(),
        note: String::new(),
        host: "pvm".into(),
        unix_time: 0,
    };
    let merged = readme::merge(
        vec![row(1, "a", 1.0), row(1, "b", 2.0), row(3, "c", 3.0)],
        vec![row(1, "a", 9.0)],
    );
    assert_eq!(merged, vec![row(1, "a", 9.0), row(3, "c", 3.0)]);
    assert_eq!(readme::date(0), "1970-01-01");
    assert_eq!(readme::date(1_796_169_600 + 86_399), "2026-12-02");
    let doc = format!("intro\n{}\nold\n{}\noutro\n", readme::BEGIN, readme::END);
    let new = readme::splice(&doc, &readme::block(&merged)).expect("splice");
    assert!(
        new.starts_with("intro\n") && new.ends_with("\noutro\n"),
        "{new}"
    );
    assert_eq!(
        readme::current_block(&new),
        Some(readme::block(&merged).as_str())
    );
}
