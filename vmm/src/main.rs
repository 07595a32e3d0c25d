//! The `vmm` command: build the guest the command line asks for, run it, print what happened,
//! and exit with the code documented in `vmm::exit`.
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Parser;
use vmm::arch::x86_64::cpuid::{hidden_features_on_pvm, HostKind};
use vmm::builder::{self, BuiltVm};
use vmm::cli::{Cli, GuestChoice};
use vmm::exit::EXIT_VMM_ERROR;
use vmm::report::workload_summary;
use vmm::session::{self, SessionOptions};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn build(choice: &GuestChoice, cli: &Cli) -> Result<BuiltVm> {
    Ok(match choice {
        GuestChoice::Linux(config) => {
            if HostKind::detect() == HostKind::Pvm {
                eprintln!(
                    "vmm: host KVM is PVM: guest kernel code is emulated (slow) and guest user \
                     space cannot run on this host kind; up to {} CPU features the emulator lacks \
                     are hidden (CPUID, plus noxsave/clearcpuid= on the kernel command line)",
                    hidden_features_on_pvm().len()
                );
            }
            builder::linux::build(config, Box::new(std::io::stdout()))?
        }
        GuestChoice::Workload {
            specs,
            vcpus,
            mem_bytes,
        } => builder::workload::build(
            specs.clone(),
            *vcpus,
            *mem_bytes,
            cli.sample_period(),
            &cli.run_dir(),
        )?,
    })
}

fn run(cli: Cli) -> Result<i32> {
    let choice = cli.guest().map_err(anyhow::Error::msg)?;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(signal, on_terminate)
            .context("cannot install the SIGINT/SIGTERM handler")?;
    }
    let built = build(&choice, &cli)?;
    let is_linux = matches!(choice, GuestChoice::Linux(_));
    let terminal = if is_linux {
        Some(
            mirrorball_devices::terminal::RawTerminal::stdin()
                .context("cannot set up the terminal")?,
        )
    } else {
        None
    };
    let report = session::run(
        built,
        SessionOptions {
            timeout: cli.timeout,
            interrupted: &INTERRUPTED,
            console_input: is_linux,
            keep_regions: None,
        },
    )?;
    drop(terminal);
    if !is_linux {
        print!("{}", workload_summary(&report));
    }
    if let Some(path) = &cli.stats {
        mirrorball_profiler::report::write_json(path, &report)
            .with_context(|| format!("cannot write the stats to {path}"))?;
    }
    let code = report.end_reason.exit_code();
    eprintln!("vmm: {} (exit code {code})", report.end_reason);
    Ok(code)
}

/// Parses the command line; usage errors become one line and exit code 2.
fn parse_cli() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        if e.use_stderr() {
            // clap's message up to its usage block, folded onto one line.
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("vmm: {} (see vmm --help)", message.join(" "));
            ExitCode::from(2)
        } else {
            // --help and --version.
            let _ = e.print();
            ExitCode::SUCCESS
        }
    })
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)),
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            ExitCode::from(EXIT_VMM_ERROR as u8)
        }
    }
}
