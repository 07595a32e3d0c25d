//! `--mp3`: the output of MP3's `monitor`, one line per sampler tick:
//!
//! ```text
//! <time_ms> <minor faults> <major faults> <CPU utilization>
//! ```
//!
//! MP3's kernel module summed, at each tick, every registered process's faults and CPU time
//! since the previous tick. The ring holds one record per task per tick with absolute counters,
//! so this sink rebuilds the ticks:
//!
//! - A tick is a run of consecutive records. A new one starts when a task appears twice, or when
//!   a record is half a sampling period (from the region header) or more after the tick's first.
//! - A task's contribution is the difference to its previous record; its first record is only
//!   the baseline (its faults since process start are not this tick's).
//! - `time_ms` is the tick's first guest timestamp in ms; CPU utilization is the sum over tasks
//!   of Δ(utime + stime) / Δt (1.0 = one CPU busy), printed with 4 decimals.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};

use mirrorball_profiler_abi::{GuestSample, SeqRecord};

use super::{NameLookup, Sink};
use crate::walker::Counts;

/// Most tasks remembered; beyond that the baselines start over (a hostile ring cannot grow it).
const MAX_TASKS: usize = 4096;

#[derive(Clone, Debug, Default)]
struct Tick {
    start_ns: u64,
    tasks: BTreeSet<(u32, u32)>,
    min_flt: u64,
    maj_flt: u64,
    util: f64,
}

/// Writes MP3 profile lines.
#[derive(Debug)]
pub struct Mp3Sink<W: Write> {
    out: W,
    half_period_ns: u64,
    previous: BTreeMap<(u32, u32), GuestSample>,
    tick: Option<Tick>,
    lines: u64,
}

impl<W: Write> Mp3Sink<W> {
    /// A sink writing to `out`; `period_ns` is the sampling period (0 if unknown).
    pub fn new(out: W, period_ns: u64) -> Self {
        Self {
            out,
            half_period_ns: period_ns / 2,
            previous: BTreeMap::new(),
            tick: None,
            lines: 0,
        }
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn emit(&mut self) -> io::Result<()> {
        if let Some(t) = self.tick.take() {
            writeln!(
                self.out,
                "{} {} {} {:.4}",
                t.start_ns / 1_000_000,
                t.min_flt,
                t.maj_flt,
                t.util
            )?;
            self.lines += 1;
        }
        Ok(())
    }
}

impl<W: Write> Sink for Mp3Sink<W> {
    fn record(
        &mut self,
        rec: &SeqRecord<GuestSample>,
        _names: &mut NameLookup<'_>,
    ) -> io::Result<()> {
        let r = rec.record;
        let key = (r.task_id, r.pid);
        let new_tick = self.tick.as_ref().is_some_and(|t| {
            t.tasks.contains(&key)
                || (self.half_period_ns > 0
                    && r.timestamp_ns.saturating_sub(t.start_ns) >= self.half_period_ns)
        });
        if new_tick {
            self.emit()?;
        }
        let tick = self.tick.get_or_insert_with(|| Tick {
            start_ns: r.timestamp_ns,
            ..Tick::default()
        });
        tick.tasks.insert(key);
        if let Some(prev) = self.previous.get(&key) {
            tick.min_flt = tick
                .min_flt
                .saturating_add(r.min_flt.saturating_sub(prev.min_flt));
            tick.maj_flt = tick
                .maj_flt
                .saturating_add(r.maj_flt.saturating_sub(prev.maj_flt));
            let dt = r.timestamp_ns.saturating_sub(prev.timestamp_ns);
            let cpu = |s: &GuestSample| s.utime_ns.saturating_add(s.stime_ns);
            if dt > 0 {
                tick.util += cpu(&r).saturating_sub(cpu(prev)) as f64 / dt as f64;
            }
        } else if self.previous.len() >= MAX_TASKS {
            self.previous.clear();
        }
        self.previous.insert(key, r);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn finish(&mut self, _counts: &Counts) -> io::Result<()> {
        self.emit()?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, ts_ms: u64, task: u32, min: u64, cpu_ms: u64) -> SeqRecord<GuestSample> {
        SeqRecord {
            seq,
            record: GuestSample {
                timestamp_ns: ts_ms * 1_000_000,
                task_id: task,
                pid: 100 + task,
                min_flt: min,
                maj_flt: 0,
                utime_ns: cpu_ms * 1_000_000,
                ..GuestSample::default()
            },
        }
    }

    #[test]
    fn ticks_sum_deltas_over_tasks() {
        let mut s = Mp3Sink::new(Vec::new(), 50_000_000);
        let mut names = |_: u32, _: u32| String::new();
        // Tick at 0 ms (baselines), 50 ms, 100 ms; task 1 exits after 50 ms.
        for r in [
            rec(1, 0, 0, 10, 0),
            rec(2, 0, 1, 20, 0),
            rec(3, 50, 0, 110, 25),
            rec(4, 50, 1, 25, 50),
            rec(5, 100, 0, 210, 50),
        ] {
            s.record(&r, &mut names).unwrap();
        }
        s.finish(&Counts::default()).unwrap();
        let text = String::from_utf8(s.into_inner()).unwrap();
        assert_eq!(text, "0 0 0 0.0000\n50 105 0 1.5000\n100 100 0 0.5000\n");
    }

    #[test]
    fn period_splits_ticks_of_one_task() {
        let mut s = Mp3Sink::new(Vec::new(), 0);
        let mut names = |_: u32, _: u32| String::new();
        for r in [rec(1, 0, 0, 1, 0), rec(2, 1, 0, 2, 0), rec(3, 2, 0, 4, 0)] {
            s.record(&r, &mut names).unwrap();
        }
        s.finish(&Counts::default()).unwrap();
        assert_eq!(s.lines(), 3);
    }
}
