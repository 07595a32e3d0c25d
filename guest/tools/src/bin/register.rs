//! `register R <pid>... | U <pid>... | list`: talks to the driver through
//! `/proc/mirrorball/status` (see `mirrorball_guest_tools::register` and `::procfs`).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use mirrorball_guest_tools::args::{self, UsageError, EXIT_USAGE};
use mirrorball_guest_tools::procfs;
use mirrorball_guest_tools::register::{self, Action, USAGE};

/// Runs the command; `Ok(false)` if some pid was refused (each refusal already printed).
fn run() -> anyhow::Result<bool> {
    let argv = args::collect(std::env::args_os().skip(1))?;
    let a = register::parse(argv)?;
    let status = procfs::status_path(&procfs::proc_dir(a.proc_dir.as_deref()));
    match a.action {
        Action::Help => {
            println!("{USAGE}");
            Ok(true)
        }
        Action::List => {
            let text = procfs::read_status(&status)?;
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .context("writing the list")?;
            Ok(true)
        }
        Action::Send(cmd, pids) => {
            let mut all_ok = true;
            for pid in pids {
                if let Err(e) = procfs::send(&status, cmd, pid) {
                    if matches!(e, procfs::ProcError::DriverAbsent { .. }) {
                        return Err(e.into());
                    }
                    eprintln!("register: {e}");
                    all_ok = false;
                }
            }
            Ok(all_ok)
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("register: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("register: {e:#}");
            ExitCode::FAILURE
        }
    }
}
