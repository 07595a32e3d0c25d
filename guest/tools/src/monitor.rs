//! The `monitor` tool: its command line and its reading loop.
//!
//! `monitor [--device PATH] [--csv FILE|- | --mp3] [--duration SECS] [--interval SECS] [--new]`
//!
//! The loop drains the guest ring with a [`Walker`] into one [`Sink`], every poll interval
//! (20 ms), until `--duration` has passed or Ctrl-C; a duration of 0 drains once. The table sink
//! is printed every `--interval` (default 1 s). At the end the caller prints [`Summary::line`],
//! which counts every lost record by cause.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mirrorball_profiler_abi::GuestRegionView;

use crate::args::{self, Cursor, UsageError};
use crate::device::DEFAULT_DEVICE;
use crate::names::Names;
use crate::sink::Sink;
use crate::walker::{Counts, Step, Walker};

/// Usage text.
pub const USAGE: &str = "usage: monitor [--device PATH] [--csv FILE|- | --mp3] \
[--duration SECS] [--interval SECS] [--new]";

/// Where the records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The live per-task table on stdout.
    Table,
    /// CSV rows to a file, or stdout for `-`.
    Csv(String),
    /// MP3 profile lines on stdout.
    Mp3,
}

/// A parsed `monitor` command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorArgs {
    /// The region's device or file.
    pub device: PathBuf,
    /// The output.
    pub output: Output,
    /// Stop after this long (`None`: until Ctrl-C).
    pub duration: Option<Duration>,
    /// Table refresh interval.
    pub interval: Duration,
    /// Start at the head (only new records) instead of the oldest record the ring holds.
    pub from_head: bool,
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Run.
    Run(MonitorArgs),
    /// Print [`USAGE`].
    Help,
}

fn set_output(a: &mut MonitorArgs, o: Output) -> Result<(), UsageError> {
    if a.output != Output::Table {
        return Err(UsageError::Arity(
            "--csv and --mp3 exclude each other".to_owned(),
        ));
    }
    a.output = o;
    Ok(())
}

/// Parses the arguments after the program name.
pub fn parse(args: Vec<String>) -> Result<Parsed, UsageError> {
    let mut cur = Cursor::new(args);
    let mut a = MonitorArgs {
        device: PathBuf::from(DEFAULT_DEVICE),
        output: Output::Table,
        duration: None,
        interval: Duration::from_secs(1),
        from_head: false,
    };
    while let Some(arg) = cur.next_arg() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--device" => a.device = PathBuf::from(cur.value(&arg)?),
            "--csv" => {
                let file = cur.value(&arg)?;
                set_output(&mut a, Output::Csv(file))?;
            }
            "--mp3" => set_output(&mut a, Output::Mp3)?,
            "--duration" => a.duration = Some(args::parse_seconds("duration", &cur.value(&arg)?)?),
            "--interval" => {
                let text = cur.value(&arg)?;
                let interval = args::parse_seconds("interval", &text)?;
                if interval < Duration::from_millis(10) {
                    return Err(UsageError::bad(
                        "interval",
                        &text,
                        "must be at least 0.01 s",
                    ));
                }
                a.interval = interval;
            }
            "--new" => a.from_head = true,
            _ if args::is_option(&arg) => return Err(UsageError::UnknownOption(arg)),
            _ => {
                return Err(UsageError::Arity(format!(
                    "unexpected argument {arg:?}; {USAGE}"
                )))
            }
        }
    }
    Ok(Parsed::Run(a))
}

/// Why the loop stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(io::Error),
    /// The region's backing file shrank (or could not be inspected).
    #[error("{0}")]
    Region(io::Error),
}

/// How the loop runs.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Stop after this long (`None`: only when `stop()` says so).
    pub duration: Option<Duration>,
    /// Sink tick interval.
    pub interval: Duration,
    /// Pause between drains of the ring.
    pub poll: Duration,
    /// Start at the head instead of the oldest record.
    pub from_head: bool,
}

impl RunOptions {
    /// Options from the command line, polling every 20 ms.
    pub fn from_args(a: &MonitorArgs) -> Self {
        Self {
            duration: a.duration,
            interval: a.interval,
            poll: Duration::from_millis(20),
            from_head: a.from_head,
        }
    }
}

/// What the loop saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records read and lost.
    pub counts: Counts,
    /// The first header change noticed (`revalidate`), if any; reading went on with the layout
    /// validated at the start.
    pub header_change: Option<String>,
}

impl Summary {
    /// The one-line summary the binary prints on stderr.
    pub fn line(&self) -> String {
        let c = &self.counts;
        let mut line = format!(
            "monitor: {} records, {} lost (overwritten {}, torn {}, stale {})",
            c.read,
            c.lost(),
            c.overwritten,
            c.torn,
            c.stale
        );
        if c.regressed > 0 {
            line.push_str(&format!(", ring head went backwards {} times", c.regressed));
        }
        if let Some(change) = &self.header_change {
            line.push_str(&format!(", header changed: {change}"));
        }
        line
    }
}

/// Drains the ring into `sink`: at most `max_steps` steps. Returns true if it stopped at the
/// head (false: more may be waiting).
fn drain(
    view: &GuestRegionView<'_>,
    walker: &mut Walker<'_>,
    names: &mut Names,
    sink: &mut dyn Sink,
    max_steps: u64,
) -> Result<bool, MonitorError> {
    let mut lookup = |task_id: u32, pid: u32| names.get(view, task_id, pid);
    for _ in 0..max_steps {
        match walker.step() {
            Step::Record(rec) => sink
                .record(&rec, &mut lookup)
                .map_err(MonitorError::Output)?,
            Step::Empty => return Ok(true),
            Step::Lost { .. } | Step::Regressed { .. } => {}
        }
    }
    Ok(false)
}

/// Reads `view`'s ring into `sink` until the duration passes or `stop()` is true, then drains
/// once more and finishes the sink. `check` is called before every drain (the binary checks that
/// a region file did not shrink).
pub fn run(
    view: &GuestRegionView<'_>,
    sink: &mut dyn Sink,
    opts: &RunOptions,
    stop: &dyn Fn() -> bool,
    check: &dyn Fn() -> io::Result<()>,
) -> Result<Summary, MonitorError> {
    let ring = view.ring();
    let mut walker = if opts.from_head {
        Walker::from_head(ring)
    } else {
        Walker::from_oldest(ring)
    };
    // Enough steps to cross the whole ring plus its gaps, bounded for huge rings.
    let max_steps = u64::from(ring.capacity())
        .saturating_mul(2)
        .clamp(1024, 1 << 24);
    let mut names = Names::new();
    let mut summary = Summary::default();
    sink.start().map_err(MonitorError::Output)?;
    let started = Instant::now();
    let mut next_tick = started + opts.interval;
    loop {
        check().map_err(MonitorError::Region)?;
        if summary.header_change.is_none() {
            if let Err(e) = view.revalidate() {
                summary.header_change = Some(e.to_string());
            }
        }
        let caught_up = drain(view, &mut walker, &mut names, sink, max_steps)?;
        sink.flush().map_err(MonitorError::Output)?;
        let now = Instant::now();
        if now >= next_tick {
            sink.tick(&walker.counts()).map_err(MonitorError::Output)?;
            next_tick = (next_tick + opts.interval).max(now);
        }
        let deadline = opts.duration.map(|d| started + d);
        if stop() || deadline.is_some_and(|d| now >= d) {
            break;
        }
        if caught_up {
            let mut wake = (now + opts.poll).min(next_tick);
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            std::thread::sleep(wake.saturating_duration_since(now));
        }
    }
    check().map_err(MonitorError::Region)?;
    drain(view, &mut walker, &mut names, sink, max_steps)?;
    summary.counts = walker.counts();
    sink.finish(&summary.counts).map_err(MonitorError::Output)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_options() {
        let Ok(Parsed::Run(a)) = parse(argv("--device /tmp/r --csv - --duration 0.5 --new")) else {
            panic!("should parse");
        };
        assert_eq!(a.device, PathBuf::from("/tmp/r"));
        assert_eq!(a.output, Output::Csv("-".to_owned()));
        assert_eq!(a.duration, Some(Duration::from_millis(500)));
        assert!(a.from_head);
        assert_eq!(
            parse(argv("--mp3")).map(|p| matches!(
                p,
                Parsed::Run(MonitorArgs {
                    output: Output::Mp3,
                    ..
                })
            )),
            Ok(true)
        );
        for bad in [
            "--csv",
            "--csv a --mp3",
            "--duration -1",
            "--interval 0",
            "extra",
            "--what",
        ] {
            assert!(parse(argv(bad)).is_err(), "{bad}");
        }
    }
}
