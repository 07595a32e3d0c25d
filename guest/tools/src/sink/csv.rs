//! `--csv FILE|-`: one row per intact ring record, in sequence order.
//!
//! Columns: `timestamp_ns,task_id,pid,min_flt,maj_flt,utime_ns,stime_ns,seq` — the record's
//! guest timestamp, task id, pid, absolute minor and major faults, absolute user and system CPU
//! time in ns, and its sequence number. Every value is an unsigned integer, so no quoting is
//! needed. Lost records are not rows; the monitor reports their count at the end.

use std::io::{self, Write};

use mirrorball_profiler_abi::{GuestSample, SeqRecord};

use super::{NameLookup, Sink};
use crate::walker::Counts;

/// The header row.
pub const HEADER: &str = "timestamp_ns,task_id,pid,min_flt,maj_flt,utime_ns,stime_ns,seq";

/// The CSV row of `rec` (without a newline).
pub fn row(rec: &SeqRecord<GuestSample>) -> String {
    let r = &rec.record;
    format!(
        "{},{},{},{},{},{},{},{}",
        r.timestamp_ns, r.task_id, r.pid, r.min_flt, r.maj_flt, r.utime_ns, r.stime_ns, rec.seq
    )
}

/// Writes CSV rows to `W`.
#[derive(Debug)]
pub struct CsvSink<W: Write> {
    out: W,
}

impl<W: Write> CsvSink<W> {
    /// A sink writing to `out` (buffer it: rows are written one by one).
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Sink for CsvSink<W> {
    fn start(&mut self) -> io::Result<()> {
        writeln!(self.out, "{HEADER}")
    }

    fn record(
        &mut self,
        rec: &SeqRecord<GuestSample>,
        _names: &mut NameLookup<'_>,
    ) -> io::Result<()> {
        writeln!(self.out, "{}", row(rec))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn finish(&mut self, _counts: &Counts) -> io::Result<()> {
        self.out.flush()
    }
}
