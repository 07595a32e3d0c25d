//! `work <MiB> <R|L> <accesses> [iterations]`: MP3's page-fault workload (see
//! `mirrorball_guest_tools::work`).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use mirrorball_guest_tools::args::{self, UsageError, EXIT_USAGE};
use mirrorball_guest_tools::signal;
use mirrorball_guest_tools::work::{self, Parsed, USAGE};

fn run() -> anyhow::Result<()> {
    let argv = args::collect(std::env::args_os().skip(1))?;
    let a = match work::parse(argv)? {
        Parsed::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Parsed::Run(a) => a,
    };
    signal::install().context("installing the Ctrl-C handler")?;
    let mut out = std::io::stdout().lock();
    let report = work::run(&a, &mut out, &signal::stop_requested)
        .with_context(|| format!("pid {}", std::process::id()))?;
    writeln!(out, "{}", report.summary()).context("writing the summary")?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("work: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("work: {e:#}");
            ExitCode::FAILURE
        }
    }
}
