//! The `vmm` command: build the guest the command line asks for, run it, print what happened,
//! and exit with the code documented in `vmm::exit`.
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Parser;
use std::sync::Arc;

use vmm::arch::x86_64::cpuid::{hidden_features_on_pvm, HostKind};
use vmm::budget::choice::ActiveBudget;
use vmm::budget::{self};
use vmm::builder::ConsoleSink;
use vmm::cli::{Cli, Command, RunOptions};
use vmm::exit::EXIT_VMM_ERROR;
use vmm::fleet::{self, FleetPlan};
use vmm::host::HostContext;
use vmm::ksm;
use vmm::report::workload_summary;
use vmm::session::{self, SessionOptions};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_interrupt_handlers() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(signal, on_terminate)
            .context("cannot install the SIGINT/SIGTERM handler")?;
    }
    Ok(())
}

/// Runs a subcommand: a fleet file, or a profile consumer (`vmm record|plot|top|prometheus`).
fn run_tool(command: Command) -> Result<i32> {
    use mirrorball_monitor::{plot, prometheus, record, resolve_run_dir, top};
    use std::time::Duration;
    match command {
        Command::Fleet(args) => {
            let plan = match fleet::file::load(&args.file, args.run.sample_hz) {
                Ok(plan) => plan,
                Err(e @ fleet::FleetError::Snapshot { .. }) => {
                    eprintln!("vmm: error: {e}");
                    return Ok(vmm::snapshot::EXIT_SNAPSHOT);
                }
                Err(e) => return Err(e.into()),
            };
            return run_vms(plan, &args.run);
        }
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
            );
            // Interrupted (even while waiting for a VM) is exit code 130, as documented.
            let interrupted = INTERRUPTED.load(Ordering::SeqCst);
            match summary {
                Ok(summary) => eprintln!("vmm: {summary}"),
                Err(_) if interrupted => eprintln!("vmm: interrupted"),
                Err(e) => return Err(e.into()),
            }
            if interrupted {
                return Ok(vmm::exit::VmEnd::Interrupted.exit_code());
            }
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
        Command::Diff(a) => return Ok(vmm::gates::diff::run(&a)),
        Command::Ctl(a) => return ctl(a),
        Command::Study(a) => return vmm::study::run(&a),
    }
    Ok(0)
}

/// `vmm ctl`: one request to a running VM; prints the reply line; exit code 0, 20 or 21.
fn ctl(args: vmm::cli::CtlArgs) -> Result<i32> {
    use vmm::control::{client, protocol::Command as Ctl};
    let command = match (args.command.as_str(), args.dir) {
        ("snapshot", Some(dir)) => Ctl::Snapshot {
            dir: std::path::absolute(&dir)
                .unwrap_or(dir)
                .to_string_lossy()
                .into_owned(),
        },
        ("snapshot", None) => anyhow::bail!("vmm ctl NAME snapshot needs a directory"),
        (_, Some(dir)) => anyhow::bail!(
            "{} takes no directory (got {})",
            args.command,
            dir.display()
        ),
        ("status", None) => Ctl::Status,
        ("pause", None) => Ctl::Pause,
        ("resume", None) => Ctl::Resume,
        _ => Ctl::Stop,
    };
    let run_dir = mirrorball_monitor::resolve_run_dir(args.run_dir.as_deref());
    let sent = client::find_socket(&run_dir, &args.name).and_then(|path| {
        client::request(&path, command, std::time::Duration::from_secs(args.timeout))
    });
    match sent {
        Ok(reply) => {
            println!("{}", String::from_utf8_lossy(&reply.to_line()).trim_end());
            if reply.ok {
                Ok(0)
            } else {
                eprintln!(
                    "vmm: {}: {}",
                    args.name,
                    reply.error.as_deref().unwrap_or("refused")
                );
                Ok(client::EXIT_REFUSED)
            }
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            Ok(e.exit_code())
        }
    }
}

fn run(mut cli: Cli) -> Result<i32> {
    match cli.command.take() {
        Some(command) => run_tool(command),
        None if cli.restore.is_some() => {
            if refuse_lazy_with_pager(cli.lazy, &cli.run) {
                return Ok(2);
            }
            let dir = cli.restore.clone().unwrap_or_default();
            let config = match vmm::snapshot::restore::read_config(&dir) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("vmm: error: {e}");
                    return Ok(vmm::snapshot::EXIT_SNAPSHOT);
                }
            };
            // Lazy clones share no template pages: memory of their own each
            // (`VmPlan::restore_memory`).
            let share = if cli.lazy {
                vmm::fleet::ShareMode::None
            } else {
                vmm::fleet::ShareMode::Template
            };
            let mut plan = FleetPlan::copies(config, cli.vms, Some(share))?;
            for vm in &mut plan.vms {
                vm.restore = Some(dir.clone());
            }
            let trigger = cli.snapshot_trigger().map_err(anyhow::Error::msg)?;
            run_vms_from(plan, &cli.run, Some(&dir), trigger)
        }
        None => {
            let config = cli.guest().map_err(anyhow::Error::msg)?;
            let trigger = cli.snapshot_trigger().map_err(anyhow::Error::msg)?;
            let plan = FleetPlan::copies(config, cli.vms, cli.share)?;
            run_vms_from(plan, &cli.run, None, trigger)
        }
    }
}

/// Whether `--lazy` clones meet `--pager uffd` (their pages come through a userfaultfd of their
/// own): then says so in one line.
fn refuse_lazy_with_pager(lazy: bool, options: &RunOptions) -> bool {
    let refused = lazy && options.budget.pager == vmm::budget::PagerChoice::Uffd;
    if refused {
        eprintln!("vmm: error: {}", vmm::budget::uffd::PagerError::LazyRestore);
    }
    refused
}

/// Prints the one-line notices about the host that matter for these VMs.
fn host_notices(plan: &FleetPlan, host: &HostContext) {
    if plan.has_linux() && host.kind() == HostKind::Pvm {
        eprintln!(
            "vmm: host KVM is PVM: guest kernel code is emulated (slow) and guest user space \
             cannot run on this host kind; up to {} CPU features the emulator lacks are hidden \
             (CPUID, plus noxsave/clearcpuid= on the kernel command line)",
            hidden_features_on_pvm().len()
        );
    }
    if host.ksm() {
        if let Some(line) = ksm::host_notice() {
            eprintln!("vmm: {line}");
        }
    }
}

/// Builds, runs and reports the VMs of `plan`; returns the exit code.
fn run_vms(plan: FleetPlan, options: &RunOptions) -> Result<i32> {
    run_vms_from(plan, options, None, None)
}

/// [`run_vms`], the VMs clones of the snapshot in `restore` if given, each snapshotted when
/// `snapshot` says (into DIR, or DIR/NAME when there are several).
fn run_vms_from(
    plan: FleetPlan,
    options: &RunOptions,
    restore: Option<&std::path::Path>,
    snapshot: Option<(vmm::session::SnapshotWhen, std::path::PathBuf)>,
) -> Result<i32> {
    plan.check()?;
    let lazy = plan
        .vms
        .iter()
        .any(|vm| vm.restore_memory() == Some(vmm::snapshot::restore::RestoreMemory::Lazy));
    if refuse_lazy_with_pager(lazy, options) {
        return Ok(2);
    }
    if let Some(path) = options.stats.as_deref().filter(|p| *p != "-") {
        // Checked (and created) before the run, not after it.
        mirrorball_monitor::userfile::create_output(std::path::Path::new(path))
            .context("--stats")?;
    }
    let gates = match vmm::gates::Gates::prepare(&options.gates) {
        Ok(gates) => gates,
        Err(code) => return Ok(code),
    };
    install_interrupt_handlers()?;
    let budget = match enter_budget(&plan, options) {
        Ok(budget) => budget,
        Err(code) => return Ok(code),
    };
    let mut host = HostContext::new(&options.run_dir(), options.ksm).context("cannot open KVM")?;
    host.set_private_ram(budget.as_ref().is_some_and(ActiveBudget::kernel_may_swap));
    if let Some(pager) = budget.as_ref().and_then(ActiveBudget::pager) {
        host.set_pager(pager.clone());
    }
    let host = Arc::new(host);
    host_notices(&plan, &host);
    let consoles = fleet::consoles(&plan, &options.log_dir)?;
    let terminal = if consoles.contains(&ConsoleSink::Stdout) {
        Some(
            mirrorball_devices::terminal::RawTerminal::stdin()
                .context("cannot set up the terminal")?,
        )
    } else {
        None
    };
    let ksm_before = options.ksm.then(ksm::KsmFigures::read);
    let started = match restore {
        Some(dir) => match vmm::snapshot::restore::load(dir, &host) {
            Ok(loaded) => match vmm::snapshot::restore::launch(
                dir,
                &std::sync::Arc::new(loaded),
                &plan,
                consoles,
                &host,
                options.attribution,
                plan.vms
                    .first()
                    .and_then(|vm| vm.restore_memory())
                    .unwrap_or_default(),
            ) {
                Ok(started) => started,
                Err(e) => {
                    eprintln!("vmm: error: {e}");
                    return Ok(vmm::snapshot::EXIT_SNAPSHOT);
                }
            },
            Err(e) => {
                eprintln!("vmm: error: {e}");
                return Ok(vmm::snapshot::EXIT_SNAPSHOT);
            }
        },
        None => fleet::launch(&plan, consoles, &host, options.attribution),
    };
    let mut started = started;
    if let Some((when, dir)) = snapshot {
        let many = started.len() > 1;
        if many {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("snapshot: cannot create {}", dir.display()))?;
        }
        for vm in started.iter_mut().flatten() {
            let dir = if many {
                dir.join(vm.name())
            } else {
                dir.clone()
            };
            if let Err(e) = vm.snapshot_when(when.clone(), dir) {
                // Refused before anything ran: every VM ends at once, the command with 2.
                eprintln!("vmm: error: {e}");
                for vm in started.iter().flatten() {
                    vm.stop(vmm::exit::VmEnd::Interrupted);
                }
                drop(session::run_all(
                    started,
                    &SessionOptions {
                        timeout: None,
                        interrupted: &INTERRUPTED,
                        console_input: false,
                        keep_regions: None,
                    },
                ));
                return Ok(2);
            }
        }
    }
    let results = session::run_all(
        started,
        &SessionOptions {
            timeout: options.timeout,
            interrupted: &INTERRUPTED,
            console_input: terminal.is_some(),
            keep_regions: None,
        },
    );
    drop(terminal);
    for report in results.iter().flatten() {
        if !report.tasks.is_empty() {
            print!("{}", workload_summary(report));
        }
    }
    if let Some(before) = ksm_before {
        eprintln!("vmm: {}", ksm::KsmFigures::read().summary_since(&before));
    }
    let budget_report = budget.as_ref().map(ActiveBudget::report);
    if let Some(path) = &options.stats {
        write_stats(path, &results, budget_report.as_ref())
            .with_context(|| format!("cannot write the stats to {path}"))?;
    }
    let mut code = fleet::summary::exit_code(&results);
    // KVM could not fault a guest page in for seconds: the cgroup cannot reclaim.
    let faulted = results.iter().flatten().any(
        |r| matches!(&r.end_reason, vmm::exit::VmEnd::VmmError(m) if m.contains("os error 14")),
    );
    if let Some(report) = budget_report.as_ref().filter(|r| r.exhausted() || faulted) {
        code = budget::EXIT_BUDGET_EXHAUSTED;
        eprintln!(
            "vmm: machine memory: the {} MiB budget ran out (swap full or not reclaimable); \
             the VMs were ended (exit code {code})",
            report.budget_bytes() >> 20
        );
    }
    // The host context holds the pager too: both go before the budget is released.
    drop(host);
    drop(budget);
    match results.as_slice() {
        [Ok(report)] => {
            eprint!("{}", fleet::summary::where_vcpus_stopped(report, "vmm: "));
            eprintln!("vmm: {} (exit code {code})", report.end_reason);
        }
        [Err((_, e))] => return Err(anyhow::anyhow!("{e}")),
        _ => {
            eprint!("{}", fleet::summary::table(&results));
            eprintln!("vmm: {} VMs ended (exit code {code})", results.len());
        }
    }
    let judged = results
        .iter()
        .flatten()
        .map(|r| {
            Ok(vmm::gates::stats::VmStats {
                name: r.name.clone(),
                doc: serde_json::to_value(r)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(gates.judge(&judged, code))
}

/// Sets up `--machine-mem` (none without it); a budget that cannot be set up is one line and
/// exit code [`budget::EXIT_BUDGET_SETUP`].
fn enter_budget(plan: &FleetPlan, options: &RunOptions) -> Result<Option<ActiveBudget>, i32> {
    let demand = budget::choice::Demand {
        guest_bytes: plan
            .vms
            .iter()
            .map(|vm| vm.config.ram_bytes().unwrap_or(0))
            .sum(),
        vms: plan.vms.len(),
        // Copy-on-write clones of a snapshot share its template too.
        template_clones: plan
            .vms
            .iter()
            .any(|vm| vm.share == vmm::fleet::ShareMode::Template),
        ksm: options.ksm,
    };
    ActiveBudget::enter(&options.budget, &demand).map_err(|e| {
        let code = budget::EXIT_BUDGET_SETUP;
        eprintln!("vmm: machine memory: {e} (exit code {code})");
        code
    })
}

/// `--stats`: one VM's report object, or {"vms": [...]} for a fleet (a VM that could not be
/// built is {"name", "refused"}); with a budget, also "machine_memory".
fn write_stats(
    path: &str,
    results: &[fleet::summary::VmResult],
    budget: Option<&budget::choice::AnyBudgetReport>,
) -> Result<()> {
    let mut value = match results {
        [Ok(report)] => serde_json::to_value(report)?,
        _ => serde_json::json!({
            "vms": results
                .iter()
                .map(|r| match r {
                    Ok(report) => serde_json::to_value(report),
                    Err((name, e)) => Ok(serde_json::json!({"name": name, "refused": e.to_string()})),
                })
                .collect::<Result<Vec<_>, _>>()?
        }),
    };
    if let (Some(b), Some(object)) = (budget, value.as_object_mut()) {
        object.insert("machine_memory".into(), serde_json::to_value(b)?);
    }
    mirrorball_profiler::report::write_json(path, &value)?;
    Ok(())
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

/// The error and its causes on one line, leaving out a cause whose text the line already holds
/// (many errors quote their source, e.g. an OS error, in their own message).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn main() -> ExitCode {
    budget::rseq::exec_without_rseq_if_budgeted();
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)),
        Err(e) => {
            eprintln!("vmm: error: {}", one_line(&e));
            ExitCode::from(u8::try_from(EXIT_VMM_ERROR).unwrap_or(u8::MAX))
        }
    }
}
