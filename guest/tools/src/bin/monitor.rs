//! `monitor [--device PATH] [--csv FILE|- | --mp3] [--duration SECS] [--interval SECS] [--new]`:
//! reads the profiler's guest region (see `mirrorball_guest_tools::monitor`).

use std::fs::File;
use std::io::{self, BufWriter};
use std::process::ExitCode;

use anyhow::Context;
use mirrorball_guest_tools::args::{self, UsageError, EXIT_USAGE};
use mirrorball_guest_tools::device::DeviceMap;
use mirrorball_guest_tools::monitor::{self, MonitorError, Output, Parsed, RunOptions, USAGE};
use mirrorball_guest_tools::signal;
use mirrorball_guest_tools::sink::{csv::CsvSink, mp3::Mp3Sink, table::TableSink, Sink};

fn run() -> anyhow::Result<()> {
    let argv = args::collect(std::env::args_os().skip(1))?;
    let a = match monitor::parse(argv)? {
        Parsed::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Parsed::Run(a) => a,
    };
    let map = DeviceMap::open(&a.device)?;
    let view = map.view()?;
    signal::install().context("installing the Ctrl-C handler")?;
    let stdout = io::stdout();
    let mut sink: Box<dyn Sink> = match &a.output {
        Output::Table => Box::new(TableSink::new(stdout.lock())),
        Output::Csv(path) if path == "-" => Box::new(CsvSink::new(BufWriter::new(stdout.lock()))),
        Output::Csv(path) => {
            let file = File::create(path).with_context(|| format!("creating {path}"))?;
            Box::new(CsvSink::new(BufWriter::new(file)))
        }
        Output::Mp3 => Box::new(Mp3Sink::new(
            BufWriter::new(stdout.lock()),
            view.sample_period_ns(),
        )),
    };
    let opts = RunOptions::from_args(&a);
    let result = monitor::run(
        &view,
        sink.as_mut(),
        &opts,
        &signal::stop_requested,
        &|| map.check(),
    );
    match result {
        Ok(summary) => {
            eprintln!("{}", summary.line());
            Ok(())
        }
        // The reader of our output went away (`monitor --csv - | head`): not an error.
        Err(MonitorError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", a.device.display())),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("monitor: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("monitor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
