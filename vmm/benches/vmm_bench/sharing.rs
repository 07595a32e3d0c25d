//! Group 11, Disco memory: what template sharing saves and costs, measured in this process.
//!
//! - host memory of 8 clones × 256 MiB reading one data set, against one such VM (and the same
//!   with memory of their own): private anonymous pages + the shmem pages of the template (or of
//!   each VM's memfd) + page tables, never RSS (which counts a shared page once per mapping);
//! - launching 8 clones against one, until every vCPU has entered KVM_RUN: in process (template
//!   prepared, VMs built and started), and as the `vmm --vms N` command from its spawn (the
//!   issue's measure; the time comes from `--stats`), with the command's start → exit too;
//! - a guest's copy-on-write break per page against a first touch of fresh memory and a read of
//!   a template page (same task, same pages), and a plain 4 KiB copy on the host;
//! - the sharing scan's cost per GiB of guest memory, and its effect on a workload's run time.
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirrorball_profiler::thread_usage::monotonic_ns;
use vmm::builder::{self, ConsoleSink, GuestConfig, MemorySource, VmResources, WorkloadConfig};
use vmm::host::HostContext;
use vmm::session::{self, SessionOptions};
use vmm::vstate::memory::file_resident_bytes;

use super::report::{median, spread, Row, Target};

const MIB: f64 = (1u64 << 20) as f64;
static NEVER: AtomicBool = AtomicBool::new(false);

fn config(spec: &str, period: Option<Duration>) -> Result<GuestConfig> {
    Ok(GuestConfig::Workload(WorkloadConfig {
        specs: vec![spec.parse().context("spec")?],
        vcpus: 1,
        mem_bytes: None,
        profile_period: period,
    }))
}

/// Spawns `vmm` (a `vmm` command, given `--stats stats` here) and waits for it; returns the ms
/// from the spawn to its last vCPU's first KVM_RUN (host CLOCK_MONOTONIC, one clock for both
/// processes, read from `--stats`), the ms from the spawn to its exit status, and its output.
pub fn spawn_to_all_running(
    mut vmm: std::process::Command,
    stats: &Path,
) -> Result<(f64, f64, std::process::Output)> {
    let _ = std::fs::remove_file(stats);
    let start = monotonic_ns();
    let wall = Instant::now();
    let out = vmm.arg("--stats").arg(stats).output()?;
    let ended = wall.elapsed().as_secs_f64() * 1e3;
    let last = last_first_run(stats).with_context(|| {
        format!(
            "no vCPU start times in {}: {}",
            stats.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((last.saturating_sub(start) as f64 / 1e6, ended, out))
}

/// When the last vCPU of the VMs in a `--stats` file first entered KVM_RUN (host
/// CLOCK_MONOTONIC, ns).
fn last_first_run(stats: &Path) -> Result<u64> {
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(stats)?)?;
    // One VM's stats are its report; a fleet's are {"vms": [...]}.
    let vms = match written.get("vms").and_then(|v| v.as_array()) {
        Some(vms) => vms.clone(),
        None => vec![written],
    };
    let mut last = 0u64;
    for vm in &vms {
        for vcpu in vm["vcpus"].as_array().context("stats: no vcpus")? {
            let first = vcpu["first_run_monotonic_ns"]
                .as_u64()
                .context("stats: a vCPU never ran")?;
            last = last.max(first);
        }
    }
    Ok(last)
}

fn options() -> SessionOptions<'static> {
    SessionOptions {
        timeout: Some(Duration::from_secs(300)),
        interrupted: &NEVER,
        console_input: false,
        keep_regions: None,
    }
}

fn build_vm(
    config: &GuestConfig,
    memory: MemorySource,
    host: &Arc<HostContext>,
    name: String,
) -> Result<builder::BuiltVm> {
    builder::build(
        config,
        VmResources {
            name,
            memory,
            console: ConsoleSink::Null,
            host: host.clone(),
        },
    )
    .context("building a VM")
}

/// Runs `count` VMs of `spec` (cloned or with memory of their own) to their end and returns the
/// host memory they held: their private pages (as their last scan found them) plus the shmem
/// pages of the template, or of each VM's own memfd. Page tables are left out.
fn memory_of(host: &Arc<HostContext>, spec: &str, count: usize, share: bool) -> Result<f64> {
    let config = config(spec, None)?;
    let shared = if share {
        Some(Arc::new(builder::prepare_shared_image(&config, host)?))
    } else {
        None
    };
    let mut files = Vec::new();
    let mut started = Vec::new();
    for i in 0..count {
        let memory = match &shared {
            Some(s) => MemorySource::Template(s.clone()),
            None => MemorySource::Fresh,
        };
        let built = build_vm(&config, memory, host, format!("m{i}"))?;
        // Kept open, the memfd keeps its pages after the VM is gone, to be counted.
        files.push(built.vm.ram().file().try_clone()?);
        let name = built.name.clone();
        started.push(session::start(built).map_err(|e| (name, e)));
    }
    let mut private = 0;
    for r in session::run_all(started, &options()) {
        match r {
            Ok(report) => private += report.memory.map_or(0, |m| m.total.private),
            Err((name, e)) => bail!("{name}: {e}"),
        }
    }
    let files: u64 = match &shared {
        Some(s) => s.template.resident_bytes(),
        None => files.iter().map(file_resident_bytes).sum(),
    };
    // With memory of its own a VM's private pages are its memfd's pages: count them once.
    let private = if share { private * 4096 } else { 0 };
    Ok((private + files) as f64)
}

/// Per-page guest time of one `spec` task (its elapsed time over the pages it touched).
fn per_page_ns(
    host: &Arc<HostContext>,
    spec: &str,
    memory: MemorySource,
    period: Option<Duration>,
) -> Result<(f64, u64)> {
    let config = config(spec, period)?;
    let built = build_vm(&config, memory, host, "p".into())?;
    let report = session::run(built, options()).context("running")?;
    let task = report.tasks.first().context("no task")?;
    let pages = task
        .memory
        .as_ref()
        .map_or(0, |m| m.pages.private + m.pages.shared)
        .max(1);
    Ok((task.progress.elapsed_ns as f64 / pages as f64, pages))
}

fn memcpy_4k_ns() -> f64 {
    let src = vec![7u8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    // Touch the destination first: this is the copy alone, not its faults.
    dst.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let start = Instant::now();
    for (d, s) in dst.chunks_exact_mut(4096).zip(src.chunks_exact(4096)) {
        d.copy_from_slice(s);
    }
    std::hint::black_box(&dst);
    start.elapsed().as_nanos() as f64 / (16384.0)
}

/// Group 11.
pub fn run(vmm: &Path, runs: usize) -> Result<Vec<Row>> {
    let scratch = std::env::temp_dir().join(format!("mb-bench-sharing-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    // Run files where users' runs keep theirs by default (tmpfs).
    let run_dir = super::guest::run_dir("sharing");
    let host = Arc::new(HostContext::new(&run_dir, false)?);
    let mut rows = Vec::new();

    // 1. Host memory: 8 clones vs one, and 8 with memory of their own.
    let spec = "read 248 R 1000000 1";
    let one = memory_of(&host, spec, 1, true)?;
    let eight = memory_of(&host, spec, 8, true)?;
    let eight_own = memory_of(&host, spec, 8, false)?;
    rows.push(Row::measured(
        11,
        "share_memory_8",
        "8 clones × 256 MiB reading one data set: host memory vs one such VM",
        "MiB",
        eight / MIB,
        "one VM",
        Some(one / MIB),
        Target::RatioAtMost { value: 1.25 },
        format!("`{spec}` per VM; private pages + template pages (st_blocks)"),
    ));
    rows.push(Row::measured(
        11,
        "share_memory_8_none",
        "same, --share none",
        "MiB",
        eight_own / MIB,
        "one VM",
        Some(one / MIB),
        Target::None,
        "each VM's own memfd pages".into(),
    ));

    // 2. Launch: 8 clones vs 1, in process (prepare + build + start), and as a command.
    let tiny = config("read 1 R 1 1", Some(Duration::from_millis(50)))?;
    let launch = |count: usize| -> Result<f64> {
        let start = Instant::now();
        let plan = vmm::fleet::FleetPlan {
            vms: (0..count)
                .map(|i| vmm::fleet::VmPlan {
                    name: format!("l{i}"),
                    config: tiny.clone(),
                    share: vmm::fleet::ShareMode::Template,
                    restore: None,
                })
                .collect(),
        };
        let started = vmm::fleet::launch(
            &plan,
            vec![ConsoleSink::Null; count],
            &host,
            Default::default(),
        );
        // `launch` returns once every vCPU thread is released to run.
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        for r in session::run_all(started, &options()) {
            if let Err((name, e)) = r {
                bail!("{name}: {e}");
            }
        }
        Ok(elapsed)
    };
    let (mut ones, mut eights) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(3) {
        ones.push(launch(1)?);
        eights.push(launch(8)?);
    }
    rows.push(Row::measured(
        11,
        "clone_launch_8",
        "launch 8 clones in process (template, build, start; every vCPU released to run) vs one",
        "ms",
        median(&eights),
        "one",
        Some(median(&ones)),
        Target::OursAtMost { value: 30.0 },
        format!(
            "median of {}; 8: {} ms, 1: {} ms; the VMM's own work per VM (the command row \
             below is the issue's measure)",
            eights.len(),
            spread(&eights, 2),
            spread(&ones, 2)
        ),
    ));
    let command = |n: &str| -> Result<(f64, f64)> {
        let mut vmm_cmd = std::process::Command::new(vmm);
        vmm_cmd
            .args(["--vms", n, "--workload", "read 1 R 1 1"])
            .env("MIRRORBALL_RUN_DIR", &run_dir);
        let (running, ended, out) =
            spawn_to_all_running(vmm_cmd, &scratch.join(format!("launch-{n}.json")))?;
        if !out.status.success() {
            bail!(
                "vmm --vms {n} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((running, ended))
    };
    let (mut c1, mut c8) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(7) {
        c1.push(command("1")?);
        c8.push(command("8")?);
    }
    let running = |v: &[(f64, f64)]| v.iter().map(|c| c.0).collect::<Vec<_>>();
    let ended = |v: &[(f64, f64)]| v.iter().map(|c| c.1).collect::<Vec<_>>();
    rows.push(Row::measured(
        11,
        "clone_command_launch_8",
        "`vmm --vms 8`: command start → every vCPU in KVM_RUN, vs `--vms 1`",
        "ms",
        median(&running(&c8)),
        "--vms 1",
        Some(median(&running(&c1))),
        Target::RatioAtMost { value: 2.0 },
        format!(
            "median of {}, interleaved; spawn to the last vCPU's first KVM_RUN (host \
             CLOCK_MONOTONIC, from `--stats`); 8: {} ms, 1: {} ms; profiler on (20 Hz); \
             also ≤ 30 ms",
            c8.len(),
            spread(&running(&c8), 2),
            spread(&running(&c1), 2)
        ),
    ));
    rows.push(Row::measured(
        11,
        "clone_command_8",
        "`vmm --vms 8` start → exit of the smallest workload vs `--vms 1`",
        "ms",
        median(&ended(&c8)),
        "--vms 1",
        Some(median(&ended(&c1))),
        Target::None,
        format!(
            "median of {}; same runs as the row above; includes the VMs' teardown",
            c8.len()
        ),
    ));

    // 3. Per page: CoW break vs first touch vs template read, and a host 4 KiB copy.
    let data = Arc::new(builder::prepare_shared_image(
        &config("update 64 L 900000 1", None)?,
        &host,
    )?);
    let (cow, cow_pages) = per_page_ns(
        &host,
        "update 64 L 900000 1",
        MemorySource::Template(data.clone()),
        None,
    )?;
    let (read, _) = per_page_ns(
        &host,
        "read 64 L 900000 1",
        MemorySource::Template(data),
        None,
    )?;
    let (fresh, _) = per_page_ns(&host, "work 64 L 900000 1", MemorySource::Fresh, None)?;
    let copy = memcpy_4k_ns();
    rows.push(Row::measured(
        11,
        "cow_break_vs_first_touch",
        "guest copy-on-write break per page vs first touch of fresh memory",
        "µs",
        cow / 1e3,
        "first touch",
        Some(fresh / 1e3),
        Target::None,
        format!(
            "{cow_pages} pages, one pass; template read {:.2} µs/page; host 4 KiB copy {:.3} µs",
            read / 1e3,
            copy / 1e3
        ),
    ));

    // 4. The scan: cost per GiB, and a workload's run time with scans on vs off.
    let big = config("work 1024 R 400000 1", None)?;
    let ram = build_vm(&big, MemorySource::Fresh, &host, "s".into())?;
    let report = session::run(ram, options())?;
    let touched = report.memory.as_ref().map_or(0, |m| m.total.private);
    let mut scan_vm = build_vm(&big, MemorySource::Fresh, &host, "s2".into())?;
    {
        use vm_memory::{Bytes, GuestAddress};
        let mem = scan_vm.vm.ram().memory();
        for page in 0..(1u64 << 30) / 4096 {
            mem.write_obj(1u8, GuestAddress(page * 4096))?;
        }
    }
    let mut scans = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        scan_vm.sharing.scan()?;
        scans.push(start.elapsed().as_secs_f64() * 1e6);
    }
    drop(scan_vm);
    // The scanned VM has 1 GiB of RAM.
    let per_gib = median(&scans);
    let mut pairs = Vec::new();
    for pair in 0..runs.max(3) {
        let time = |scan: bool| -> Result<f64> {
            let c = config("work 256 R 400000 3", Some(Duration::from_millis(50)))?;
            let mut b = build_vm(&c, MemorySource::Fresh, &host, "t".into())?;
            if !scan {
                b.sharing.set_period(None);
            }
            let r = session::run(b, options())?;
            Ok(r.elapsed_ns as f64)
        };
        // Alternating which goes first: the second of a pair runs after the first's teardown.
        let (on, off) = if pair % 2 == 0 {
            let on = time(true)?;
            (on, time(false)?)
        } else {
            let off = time(false)?;
            (time(true)?, off)
        };
        pairs.push(on / off);
    }
    rows.push(Row::measured(
        11,
        "sharing_scan",
        "sharing scan per GiB of guest memory (pagemap)",
        "µs",
        per_gib,
        "",
        None,
        Target::None,
        format!(
            "1 GiB of guest RAM, every page present (a run of it touched {touched}); a running \
             VM is scanned every 50 ms, or 50 × its last scan's time if longer"
        ),
    ));
    rows.push(
        Row::measured(
            11,
            "sharing_scan_overhead",
            "workload run time with sharing scans vs without",
            "ratio",
            median(&pairs),
            "",
            Some(1.0),
            Target::RatioAtMost { value: 1.02 },
            format!(
                "`work 256 R 400000 3`, median of {} back-to-back pairs, alternating which runs first ({})",
                pairs.len(),
                spread(&pairs, 3)
            ),
        )
        .with_ratio(median(&pairs)),
    );
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(rows)
}
