//! Group 13, snapshots and clones (in this process, the default configuration: profiler on at
//! 20 Hz):
//!
//! - snapshot cost: a 256 MiB workload VM whose task has touched 20 % of its RAM (51 MiB), paused
//!   and written: the pause and the memory file's size on disk, against the RAM size;
//! - restore → the clone's vCPUs running (snapshot checked, clone built, state written, threads
//!   started) against the time the original VM took from its build to the same point, and
//!   against building and starting a fresh VM of the same configuration;
//! - 8 clones against 1: restore-to-running time in process (per-clone work alone) and as the
//!   `vmm --restore DIR --vms N` command from its spawn to the last vCPU's first `KVM_RUN`, and
//!   host memory right after the restore (the clones' private pages + the snapshot file's
//!   pages, counted once);
//! - `--lazy` against the default restore: restore → running, and a page's first touch
//!   (loaded through userfaultfd vs a copy-on-write read of the mapped memory file);
//! - with `MIRRORBALL_BENCH_LINUX_SNAPSHOT=DIR` (a snapshot of a booting Linux VM, e.g. from
//!   `vmm --kernel … --snapshot-on TEXT DIR`: a boot takes minutes on PVM, so it is made once,
//!   outside the bench): restore → the clone's vCPUs running (its first guest instruction is
//!   the next thing the vCPU does) against the original VM's uptime at the snapshot.
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmm::builder::{self, ConsoleSink, GuestConfig, MemorySource, VmResources, WorkloadConfig};
use vmm::exit::VmEnd;
use vmm::fleet::{FleetPlan, ShareMode};
use vmm::host::HostContext;
use vmm::session::{self, RunningVm, SessionOptions};
use vmm::snapshot::restore;

use super::report::{median, spread, Row, Target};

const MIB: f64 = (1u64 << 20) as f64;
static NEVER: AtomicBool = AtomicBool::new(false);
/// 51 MiB of 256: 20 % of the RAM, touched in the first iteration of a long task.
const SPEC: &str = "work 51 R 2000000 100000";

fn config() -> Result<GuestConfig> {
    Ok(GuestConfig::Workload(WorkloadConfig {
        specs: vec![SPEC.parse().context("spec")?],
        vcpus: 1,
        mem_bytes: Some(256 << 20),
        profile_period: Some(Duration::from_millis(50)),
    }))
}

fn start_fresh(host: &Arc<HostContext>, name: &str) -> Result<RunningVm> {
    let built = builder::build(
        &config()?,
        VmResources {
            name: name.into(),
            memory: MemorySource::Fresh,
            console: ConsoleSink::Null,
            host: host.clone(),
        },
    )
    .context("building")?;
    session::start(built).map_err(|e| anyhow::anyhow!("starting: {e}"))
}

/// Stops `vms` and returns the private bytes they held (their final sharing scans).
fn stop_all(vms: Vec<RunningVm>) -> u64 {
    for vm in &vms {
        vm.stop(VmEnd::Interrupted);
    }
    let mut private = 0;
    for vm in vms {
        let report = vm.finish(None);
        private += report.memory.map_or(0, |m| m.total.private) * 4096;
    }
    private
}

/// Loads the snapshot in `dir` (every check, the memory checksum included); returns it and the
/// time it took.
fn load(host: &Arc<HostContext>, dir: &Path) -> Result<(f64, Arc<restore::Loaded>)> {
    let t = Instant::now();
    let loaded = restore::load(dir, host).context("load")?;
    Ok((t.elapsed().as_secs_f64() * 1e3, Arc::new(loaded)))
}

/// Starts `count` clones of `loaded`; returns the time to running and the clones.
fn restore_clones(
    host: &Arc<HostContext>,
    dir: &Path,
    loaded: &Arc<restore::Loaded>,
    count: usize,
) -> Result<(f64, Vec<RunningVm>)> {
    restore_clones_with(host, dir, loaded, count, restore::RestoreMemory::Shared)
}

/// [`restore_clones`], their memory restored as `memory` says.
fn restore_clones_with(
    host: &Arc<HostContext>,
    dir: &Path,
    loaded: &Arc<restore::Loaded>,
    count: usize,
    memory: restore::RestoreMemory,
) -> Result<(f64, Vec<RunningVm>)> {
    let t = Instant::now();
    let plan = FleetPlan::copies(loaded.config.clone(), count, Some(ShareMode::Template))?;
    let consoles = vec![ConsoleSink::Null; count];
    let started = restore::launch(
        dir,
        loaded,
        &plan,
        consoles,
        host,
        Default::default(),
        memory,
    )?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let mut vms = Vec::new();
    for s in started {
        match s {
            Ok(vm) => vms.push(vm),
            Err((name, e)) => bail!("{name}: {e}"),
        }
    }
    Ok((ms, vms))
}

pub fn run(scratch: &Path, vmm: &Path) -> Result<Vec<Row>> {
    // Run files where users' runs keep theirs by default (tmpfs).
    let run_dir = super::guest::run_dir("snapshot");
    let host = Arc::new(HostContext::new(&run_dir, false)?);
    let _ = SessionOptions {
        timeout: None,
        interrupted: &NEVER,
        console_input: false,
        keep_regions: None,
    };
    // The template: run until the task has touched its 51 MiB (its first iteration), snapshot.
    let dir = scratch.join("snapshot-256m");
    let _ = std::fs::remove_dir_all(&dir);
    let built_at = Instant::now();
    let mut original = start_fresh(&host, "template")?;
    std::thread::sleep(Duration::from_secs(3));
    let detail = original
        .snapshot_to(&dir)
        .map_err(|e| anyhow::anyhow!("snapshot: {e}"))?;
    let to_point_ms = built_at.elapsed().as_secs_f64() * 1e3;
    stop_all(vec![original]);
    let pause_ms = detail["pause_ms"].as_f64().unwrap_or(f64::NAN);
    let written = detail["memory_pages_written"].as_u64().unwrap_or(0) as f64 * 4096.0;
    let on_disk = detail["memory_allocated_bytes"].as_u64().unwrap_or(0) as f64;
    let mut rows = vec![
        Row::measured(
            13,
            "snapshot_pause",
            "snapshot of 256 MiB, 20 % touched: VM paused",
            "ms",
            pause_ms,
            "",
            None,
            Target::None,
            format!(
                "{:.0} MiB written (non-zero pages), {:.0} MiB on disk",
                written / MIB,
                on_disk / MIB
            ),
        ),
        Row::measured(
            13,
            "snapshot_size",
            "snapshot of 256 MiB, 20 % touched: memory file on disk",
            "MiB",
            on_disk / MIB,
            "guest RAM",
            Some(256.0),
            Target::None,
            "sparse: untouched pages are holes".into(),
        ),
    ];
    // Restore → running, against a fresh build → running and the original's way to the point.
    let mut load_ms = Vec::new();
    let mut restore_ms = Vec::new();
    let mut fresh_ms = Vec::new();
    for _ in 0..5 {
        let (ms, loaded) = load(&host, &dir)?;
        load_ms.push(ms);
        let (ms, vms) = restore_clones(&host, &dir, &loaded, 1)?;
        restore_ms.push(ms);
        stop_all(vms);
        let t = Instant::now();
        let vm = start_fresh(&host, "fresh")?;
        fresh_ms.push(t.elapsed().as_secs_f64() * 1e3);
        stop_all(vec![vm]);
    }
    let restore = median(&restore_ms);
    rows.push(Row::measured(
        13,
        "restore_load",
        "restore: reading and checking the snapshot (once for any number of clones)",
        "ms",
        median(&load_ms),
        "",
        None,
        Target::None,
        format!(
            "{} ms over 5 runs; reads and checksums the {:.0} MiB of data in memory.bin",
            spread(&load_ms, 1),
            written / MIB
        ),
    ));
    rows.push(Row::measured(
        13,
        "restore_vs_original",
        "restore → vCPUs running (snapshot loaded) vs the original VM's build → snapshot point",
        "ms",
        restore,
        "original to the point",
        Some(to_point_ms),
        Target::None,
        format!(
            "{} ms over 5 runs; the ≤ 0.001× target is the Linux row's (`restore_linux`): \
             this OS-less VM reached its point in 3 s, not a boot",
            spread(&restore_ms, 2)
        ),
    ));
    rows.push(Row::measured(
        13,
        "restore_vs_fresh",
        "restore → vCPUs running (snapshot loaded) vs a fresh build → vCPUs running (same VM)",
        "ms",
        restore,
        "fresh build",
        Some(median(&fresh_ms)),
        Target::None,
        format!("fresh {} ms", spread(&fresh_ms, 1)),
    ));
    match lazy_rows(&host, &dir) {
        Ok(lazy) => rows.extend(lazy),
        // Without userfaultfd (not root) there is no lazy restore to measure.
        Err(e) => eprintln!("bench: skipping the --lazy rows: {e:#}"),
    }
    // 8 clones against 1.
    let snapshot_file =
        vmm::snapshot::allocated_bytes(&dir.join(vmm::snapshot::MEMORY_FILE)) as f64;
    let (_, loaded) = load(&host, &dir)?;
    let (one_ms, one) = restore_clones(&host, &dir, &loaded, 1)?;
    let one_mem = stop_all(one) as f64 + snapshot_file;
    let (eight_ms, eight) = restore_clones(&host, &dir, &loaded, 8)?;
    let eight_mem = stop_all(eight) as f64 + snapshot_file;
    let (mut ones, mut eights) = (vec![one_ms], vec![eight_ms]);
    for _ in 0..4 {
        let (ms, vms) = restore_clones(&host, &dir, &loaded, 1)?;
        ones.push(ms);
        stop_all(vms);
        let (ms, vms) = restore_clones(&host, &dir, &loaded, 8)?;
        eights.push(ms);
        stop_all(vms);
    }
    rows.push(Row::measured(
        13,
        "clones_8_time",
        "8 clones from one loaded snapshot, in process: restore → all released to run",
        "ms",
        median(&eights),
        "1 clone",
        Some(median(&ones)),
        Target::None,
        format!(
            "median of 5, interleaved; 8: {} ms, 1: {} ms; the snapshot already read and \
             checked (the row above), so this is the per-clone work alone: build, state, start",
            spread(&eights, 2),
            spread(&ones, 2)
        ),
    ));
    rows.push(command_restore_row(scratch, vmm, &dir)?);
    rows.push(Row::measured(
        13,
        "clones_8_memory",
        "8 clones right after restore: host memory (private pages + snapshot pages once)",
        "MiB",
        eight_mem / MIB,
        "1 clone",
        Some(one_mem / MIB),
        Target::RatioAtMost { value: 1.1 },
        "the clones run (and write) from their start until all are stopped and counted".into(),
    ));
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(linux) = std::env::var_os("MIRRORBALL_BENCH_LINUX_SNAPSHOT") {
        rows.push(linux_restore(&host, Path::new(&linux))?);
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(rows)
}

/// `vmm --restore DIR --vms 8` against `--vms 1`, from the command's spawn to the last vCPU's
/// first `KVM_RUN` (the snapshot read and checked once, every clone built, given its state and
/// started): what a user waits for.
fn command_restore_row(scratch: &Path, vmm: &Path, dir: &Path) -> Result<Row> {
    let stats = scratch.join("restore-launch.json");
    let run = |n: &str| -> Result<f64> {
        let mut vmm_cmd = std::process::Command::new(vmm);
        // The clones run the snapshot's long task: the timeout ends them.
        vmm_cmd
            .args(["--vms", n, "--timeout", "0.3", "--restore"])
            .arg(dir)
            .env("MIRRORBALL_RUN_DIR", super::guest::run_dir("restore"));
        let (running, _, _) = super::sharing::spawn_to_all_running(vmm_cmd, &stats)?;
        Ok(running)
    };
    let (mut ones, mut eights) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        ones.push(run("1")?);
        eights.push(run("8")?);
    }
    let _ = std::fs::remove_dir_all(super::guest::run_dir("restore"));
    Ok(Row::measured(
        13,
        "clones_8_command",
        "`vmm --restore DIR --vms 8`: command start → every vCPU in KVM_RUN, vs `--vms 1`",
        "ms",
        median(&eights),
        "--vms 1",
        Some(median(&ones)),
        Target::RatioAtMost { value: 2.0 },
        format!(
            "median of 7, interleaved; spawn to the last vCPU's first KVM_RUN (host \
             CLOCK_MONOTONIC, from `--stats`); 8: {} ms, 1: {} ms; includes reading and \
             checking the snapshot once",
            spread(&eights, 1),
            spread(&ones, 1)
        ),
    ))
}

/// Restore → running for a Linux snapshot, against the original's uptime at the snapshot.
fn linux_restore(host: &Arc<HostContext>, dir: &Path) -> Result<Row> {
    let mut ms = Vec::new();
    let mut uptime_ms = 0.0;
    let mut mem = 0;
    for _ in 0..5 {
        let (_, loaded) = load(host, dir)?;
        uptime_ms = loaded.state.uptime_ms;
        mem = loaded.state.vm.mem_bytes >> 20;
        let (t, vms) = restore_clones(host, dir, &loaded, 1)?;
        ms.push(t);
        stop_all(vms);
    }
    Ok(Row::measured(
        13,
        "restore_linux",
        "Linux restore → vCPUs running (snapshot loaded) vs its boot to the snapshot point",
        "ms",
        median(&ms),
        "boot to the point",
        Some(uptime_ms),
        Target::RatioAtMost { value: 0.001 },
        format!(
            "{mem} MiB reference kernel, {} ms over 5 runs",
            spread(&ms, 2)
        ),
    ))
}

/// `--lazy` against the default restore: restore → running (1 clone, interleaved), and the cost
/// of a page's first touch (reading one byte of every page of the snapshot's 256 MiB from
/// another thread, as a vCPU would): a load through the userfaultfd loader against a
/// copy-on-write read of the mapped memory file.
fn lazy_rows(host: &Arc<HostContext>, dir: &Path) -> Result<Vec<Row>> {
    let (_, loaded) = load(host, dir)?;
    let (mut lazy_ms, mut shared_ms) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (ms, vms) = restore_clones_with(host, dir, &loaded, 1, restore::RestoreMemory::Lazy)?;
        lazy_ms.push(ms);
        stop_all(vms);
        let (ms, vms) = restore_clones(host, dir, &loaded, 1)?;
        shared_ms.push(ms);
        stop_all(vms);
    }
    let file = || std::fs::File::open(dir.join(vmm::snapshot::MEMORY_FILE)).context("memory.bin");
    let size = file()?.metadata()?.len();
    let (mut lazy_us, mut cow_us) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let loader = vmm::snapshot::lazy::LazyLoader::start(file()?)?;
        let mut ram = vmm::vstate::memory::GuestRam::new(size)?;
        ram.attach_lazy(&loader)?;
        lazy_us.push(touch_every_page(&ram)?);
        drop(ram);
        let template = Arc::new(vmm::vstate::memory::Template::from_file(file()?, size)?);
        let ram = vmm::vstate::memory::GuestRam::clone_of(&template)?;
        cow_us.push(touch_every_page(&ram)?);
    }
    let pages = size / 4096;
    Ok(vec![
        Row::measured(
            13,
            "restore_lazy",
            "`--lazy` restore → vCPUs running vs the default (copy-on-write) restore",
            "ms",
            median(&lazy_ms),
            "copy-on-write restore",
            Some(median(&shared_ms)),
            Target::None,
            format!(
                "1 clone of the 256 MiB snapshot, median of 5, interleaved; lazy {} ms, \
                 copy-on-write {} ms; lazy adds a userfaultfd and its fault thread",
                spread(&lazy_ms, 2),
                spread(&shared_ms, 2)
            ),
        ),
        Row::measured(
            13,
            "lazy_first_touch",
            "a page's first touch after `--lazy`: loaded by the fault thread vs copy-on-write read",
            "µs/page",
            median(&lazy_us),
            "copy-on-write read",
            Some(median(&cow_us)),
            Target::None,
            format!(
                "each of the {pages} pages of the {} MiB memory file read once from another \
                 thread, median of 3; lazy {} µs, copy-on-write {} µs (the file in the page \
                 cache)",
                size >> 20,
                spread(&lazy_us, 2),
                spread(&cow_us, 2)
            ),
        ),
    ])
}

/// Reads one byte of every page of `ram` on a new thread; returns µs per page.
fn touch_every_page(ram: &vmm::vstate::memory::GuestRam) -> Result<f64> {
    let ranges = ram.host_ranges();
    let pages: usize = ranges.iter().map(|&(_, len)| len / 4096).sum();
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            for &(start, len) in &ranges {
                for offset in (0..len).step_by(4096) {
                    // SAFETY: inside one of `ram`'s live mappings; reads only.
                    unsafe { std::ptr::read_volatile((start + offset) as *const u8) };
                }
            }
        });
    });
    Ok(t.elapsed().as_secs_f64() * 1e6 / pages.max(1) as f64)
}
