//! The `vmm` command: build the guest the command line asks for, run it, print what happened,
//! and exit with the code documented in `vmm::exit`.
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Parser;
use vmm::arch::x86_64::cpuid::{hidden_features_on_pvm, HostKind};
use vmm::builder::{self, BuiltVm};
use vmm::cli::{Cli, Command, GuestChoice};
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

fn install_interrupt_handlers() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(signal, on_terminate)
            .context("cannot install the SIGINT/SIGTERM handler")?;
    }
    Ok(())
}

/// Runs a profile consumer (`vmm record|plot|top|prometheus`).
fn run_tool(command: Command) -> Result<i32> {
    use mirrorball_monitor::{plot, prometheus, record, resolve_run_dir, top};
    use std::time::Duration;
    match command {
        Command::Record(a) => {
            install_interrupt_handlers()?;
            let summary = record::record(
                &record::RecordOptions {
                    run_dir: resolve_run_dir(a.run_dir.as_deref()),
                    vm: a.vm,
                    format: a.format,
                    output: Some(a.output),
                    duration: a.duration,
                    poll_interval: Duration::from_millis(20),
                    wait: a.wait,
                },
                &INTERRUPTED,
            )?;
            eprintln!("vmm: {summary}");
        }
        Command::Plot(a) => {
            let font = a
                .font
                .map_or(plot::FontChoice::Auto, plot::FontChoice::File);
            if !plot::load_font(&font)? {
                eprintln!(
                    "vmm: no TrueType font found (install fonts-dejavu-core or pass --font): \
                     the plots have no text"
                );
            }
            let written = plot::plot(&plot::PlotOptions {
                inputs: a.input,
                output: a.output,
                format: a.format,
                font,
            })?;
            for path in written {
                println!("{}", path.display());
            }
        }
        Command::Top(a) => top::run(&top::TopOptions {
            run_dir: resolve_run_dir(a.run_dir.as_deref()),
            interval: Duration::from_millis(a.interval),
        })
        .context("vmm top")?,
        Command::Prometheus(a) => {
            install_interrupt_handlers()?;
            prometheus::run(
                &prometheus::PromOptions {
                    run_dir: resolve_run_dir(a.run_dir.as_deref()),
                    output: a.output,
                    listen: a.listen,
                    interval: Duration::from_millis(a.interval),
                },
                &INTERRUPTED,
            )?;
        }
    }
    Ok(0)
}

fn run(mut cli: Cli) -> Result<i32> {
    if let Some(command) = cli.command.take() {
        return run_tool(command);
    }
    let choice = cli.guest().map_err(anyhow::Error::msg)?;
    install_interrupt_handlers()?;
    let mut built = build(&choice, &cli)?;
    if let Some(p) = built.profiling.as_mut() {
        p.set_attribution(cli.attribution);
    }
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
