//! The monitor's outputs. Each consumes intact ring records in sequence order:
//!
//! - [`csv::CsvSink`]: one row per record (`--csv FILE|-`);
//! - [`table::TableSink`]: a per-task table with rates, printed every interval (the default);
//! - [`mp3::Mp3Sink`]: MP3's profile lines, one per sampler tick (`--mp3`).

use std::io;

use mirrorball_profiler_abi::{GuestSample, SeqRecord};

use crate::walker::Counts;

pub mod csv;
pub mod mp3;
pub mod table;

/// Looks up the printable name of (task id, pid).
pub type NameLookup<'n> = dyn FnMut(u32, u32) -> String + 'n;

/// An output of the monitor.
pub trait Sink {
    /// Called once before the first record.
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// One intact record, in sequence order.
    fn record(
        &mut self,
        rec: &SeqRecord<GuestSample>,
        names: &mut NameLookup<'_>,
    ) -> io::Result<()>;

    /// Called every interval; `counts` are the walker's totals so far.
    fn tick(&mut self, _counts: &Counts) -> io::Result<()> {
        Ok(())
    }

    /// Called after every drain of the ring: a chance to flush.
    fn flush(&mut self) -> io::Result<()>;

    /// Called once at the end with the final counts.
    fn finish(&mut self, counts: &Counts) -> io::Result<()>;
}
