//! The default output: every interval, a table with one row per task seen in the ring.
//!
//! ```text
//! monitor: t=2.0s records=40 lost=0
//!  TASK     PID COMM              MIN_FLT    MAJ_FLT   UTIME_S   STIME_S      MIN/S    MAJ/S   CPU%
//!     0     123 work                26000          0     1.230     0.040     5200.0      0.0   98.5
//! ```
//!
//! Counters are the task's latest absolute values. Rates are over the task's records since the
//! previous table (guest clock): faults per second, and `CPU%` = Δ(utime + stime) / Δt. A task
//! whose final record is flagged exited is shown once more with `exited` after its name, then
//! dropped. Values are guest claims; arithmetic on them saturates, so garbage shows as garbage.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::Instant;

use mirrorball_profiler_abi::{GuestSample, SeqRecord, SAMPLE_EXITED};

use super::{NameLookup, Sink};
use crate::walker::Counts;

/// Most tasks tracked at once; records of further tasks are ignored (and counted).
const MAX_TASKS: usize = 4096;

#[derive(Clone, Debug)]
struct TaskRow {
    name: String,
    latest: GuestSample,
    /// The latest record when the previous table was printed.
    baseline: GuestSample,
}

/// Per-task rates between two records of one task.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// Minor faults per second.
    pub min_per_s: f64,
    /// Major faults per second.
    pub maj_per_s: f64,
    /// CPU time per wall time, percent.
    pub cpu_percent: f64,
}

/// Rates from `earlier` to `later` (zero if no guest time passed).
pub fn rates(earlier: &GuestSample, later: &GuestSample) -> Rates {
    let dt_ns = later.timestamp_ns.saturating_sub(earlier.timestamp_ns);
    if dt_ns == 0 {
        return Rates::default();
    }
    let secs = dt_ns as f64 / 1e9;
    let cpu = |s: &GuestSample| s.utime_ns.saturating_add(s.stime_ns);
    Rates {
        min_per_s: later.min_flt.saturating_sub(earlier.min_flt) as f64 / secs,
        maj_per_s: later.maj_flt.saturating_sub(earlier.maj_flt) as f64 / secs,
        cpu_percent: cpu(later).saturating_sub(cpu(earlier)) as f64 / dt_ns as f64 * 100.0,
    }
}

/// The live table.
#[derive(Debug)]
pub struct TableSink<W: Write> {
    out: W,
    started: Instant,
    tasks: BTreeMap<(u32, u32), TaskRow>,
    ignored: u64,
}

impl<W: Write> TableSink<W> {
    /// A table written to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            started: Instant::now(),
            tasks: BTreeMap::new(),
            ignored: 0,
        }
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn print(&mut self, counts: &Counts) -> io::Result<()> {
        let out = &mut self.out;
        write!(
            out,
            "monitor: t={:.1}s records={} lost={}",
            self.started.elapsed().as_secs_f64(),
            counts.read,
            counts.lost()
        )?;
        if self.ignored > 0 {
            write!(out, " ignored={}", self.ignored)?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "{:>5} {:>7} {:<16} {:>10} {:>10} {:>9} {:>9} {:>10} {:>8} {:>6}",
            "TASK",
            "PID",
            "COMM",
            "MIN_FLT",
            "MAJ_FLT",
            "UTIME_S",
            "STIME_S",
            "MIN/S",
            "MAJ/S",
            "CPU%"
        )?;
        for (&(task_id, pid), row) in &self.tasks {
            let s = &row.latest;
            let r = rates(&row.baseline, s);
            let exited = s.flags & SAMPLE_EXITED != 0;
            let name = if exited {
                format!("{} exited", row.name)
            } else {
                row.name.clone()
            };
            writeln!(
                out,
                "{:>5} {:>7} {:<16} {:>10} {:>10} {:>9.3} {:>9.3} {:>10.1} {:>8.1} {:>6.1}",
                task_id,
                pid,
                name,
                s.min_flt,
                s.maj_flt,
                s.utime_ns as f64 / 1e9,
                s.stime_ns as f64 / 1e9,
                r.min_per_s,
                r.maj_per_s,
                r.cpu_percent
            )?;
        }
        writeln!(out)?;
        out.flush()?;
        self.tasks
            .retain(|_, row| row.latest.flags & SAMPLE_EXITED == 0);
        for row in self.tasks.values_mut() {
            row.baseline = row.latest;
        }
        Ok(())
    }
}

impl<W: Write> Sink for TableSink<W> {
    fn record(
        &mut self,
        rec: &SeqRecord<GuestSample>,
        names: &mut NameLookup<'_>,
    ) -> io::Result<()> {
        let r = rec.record;
        let key = (r.task_id, r.pid);
        if let Some(row) = self.tasks.get_mut(&key) {
            row.latest = r;
        } else if self.tasks.len() < MAX_TASKS {
            let name = names(r.task_id, r.pid);
            self.tasks.insert(
                key,
                TaskRow {
                    name,
                    latest: r,
                    baseline: r,
                },
            );
        } else {
            self.ignored = self.ignored.saturating_add(1);
        }
        Ok(())
    }

    fn tick(&mut self, counts: &Counts) -> io::Result<()> {
        self.print(counts)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn finish(&mut self, counts: &Counts) -> io::Result<()> {
        self.print(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ts: u64, min: u64, cpu: u64) -> GuestSample {
        GuestSample {
            timestamp_ns: ts,
            task_id: 0,
            pid: 42,
            min_flt: min,
            utime_ns: cpu,
            ..GuestSample::default()
        }
    }

    #[test]
    fn rates_between_records() {
        let r = rates(
            &sample(1_000_000_000, 100, 0),
            &sample(1_500_000_000, 600, 250_000_000),
        );
        assert_eq!(r.min_per_s, 1000.0);
        assert_eq!(r.cpu_percent, 50.0);
        // Backwards or garbage values saturate instead of panicking.
        assert_eq!(rates(&sample(5, 9, 9), &sample(1, 0, 0)), Rates::default());
        let r = rates(&sample(0, u64::MAX, 0), &sample(1, 0, u64::MAX));
        assert_eq!(r.min_per_s, 0.0);
    }

    #[test]
    fn table_rows_and_exited_tasks() {
        let mut t = TableSink::new(Vec::new());
        let mut names = |_: u32, _: u32| "work".to_owned();
        let counts = Counts::default();
        let seq = |record| SeqRecord { seq: 1, record };
        t.record(&seq(sample(0, 10, 0)), &mut names).unwrap();
        t.record(&seq(sample(1_000_000_000, 110, 500_000_000)), &mut names)
            .unwrap();
        t.tick(&counts).unwrap();
        let mut last = sample(2_000_000_000, 110, 500_000_000);
        last.flags = SAMPLE_EXITED;
        t.record(&seq(last), &mut names).unwrap();
        t.finish(&counts).unwrap();
        assert!(
            t.tasks.is_empty(),
            "exited task dropped after its last table"
        );
        let text = String::from_utf8(t.into_inner()).unwrap();
        let rows: Vec<&str> = text.lines().filter(|l| l.contains("work")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        let first: Vec<&str> = rows[0].split_whitespace().collect();
        assert_eq!(first[..5], ["0", "42", "work", "110", "0"]);
        assert_eq!(first[7..], ["100.0", "0.0", "50.0"]);
        assert!(rows[1].contains("work exited"), "{text}");
    }
}
