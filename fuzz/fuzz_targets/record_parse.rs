//! `vmm plot -i`'s reader: `parse_record` on arbitrary bytes (CSV with a header, or JSON lines),
//! read a line at a time with at most `MAX_LINE` + 1 bytes of a line held at once.
//!
//! Checked: it never panics; every non-blank line is either a row or counted as bad (so rows +
//! bad lines ≤ lines); the first error is set exactly when some line was bad; and the plots'
//! summaries (`accumulated_faults`, `utilization`) of whatever was parsed never panic either.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mirrorball_monitor::plot::{accumulated_faults, utilization};
use mirrorball_monitor::record::parse_record;

fuzz_target!(|data: &[u8]| {
    let lines = data.split(|&b| b == b'\n').count();
    let Ok(rec) = parse_record(Cursor::new(data), Path::new("fuzz.csv")) else {
        return;
    };
    assert!(
        rec.rows.len() + rec.bad_lines <= lines,
        "{} rows + {} bad > {lines} lines",
        rec.rows.len(),
        rec.bad_lines
    );
    assert_eq!(rec.first_error.is_some(), rec.bad_lines > 0);
    let _ = accumulated_faults(&rec);
    let _ = utilization(&rec);
});
