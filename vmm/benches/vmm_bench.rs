//! Mirrorball benchmarks: the VMM against a bare kvm-ioctls VM measured in the same run.
//!
//! 1. launch → first guest exit, in process and as processes;
//! 2. launch → exit of the smallest OS-less workload, as a process;
//! 3. exit round trip for port I/O and MMIO;
//! 4. resident memory per VM;
//! 5. (opt-in, `--linux KERNEL INITRD`) Linux boot to init against QEMU;
//! 6. profiler overhead (profiler at 1 kHz vs off);
//! 7. profiler latency: sample → dashboard reader, against the refresh interval and the period;
//! 8. dashboard CPU with 10 VMs (fake and real);
//! 9. host fault tracking on vs off on a fault-heavy run;
//! 10. attribution error (exact vs sampled, against the pages each task touched) and cost;
//! 11. Disco memory: 8 template clones' host memory, clone launch, copy-on-write break cost,
//!     the sharing scan's cost;
//! 12. Copy-on-write disk: 4 KiB reads through virtio-blk vs pread, the overlay's write cost
//!     (no KVM needed);
//! 13. snapshots: snapshot pause and size (256 MiB, 20 % touched), restore → running against
//!     the original's way to the same point, 8 clones against 1;
//! 14. machine-memory budget: its cost on a workload that fits, and the thrashing knee.
//!
//! Results are ratios of numbers measured in this one run, printed as a Markdown table (and
//! written as JSON with `--json PATH`; `--update-readme` merges them into
//! `vmm/benches/results.json` and regenerates the README's table from it); nothing here asserts
//! on absolute times.
//!
//! ```text
//! cargo bench -p vmm --bench vmm_bench --no-run   # builds target/release/vmm too
//! target/release/deps/vmm_bench-<hash> [--json out.json] [--linux KERNEL INITRD]
//! cargo bench -p vmm --bench vmm_bench -- latency dashboard   # only these groups
//! ```
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[path = "vmm_bench/attribution.rs"]
mod attribution;
#[path = "vmm_bench/bare.rs"]
mod bare;
#[path = "vmm_bench/budget.rs"]
mod budget;
/// The end-to-end tests' helpers (the tiny-guest ELF writer is shared with them).
#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "vmm_bench/dashboard.rs"]
mod dashboard;
#[path = "vmm_bench/disk.rs"]
mod disk;
#[path = "vmm_bench/exits.rs"]
mod exits;
#[path = "vmm_bench/guest.rs"]
mod guest;
#[path = "vmm_bench/latency.rs"]
mod latency;
#[path = "vmm_bench/launch.rs"]
mod launch;
#[path = "vmm_bench/linux.rs"]
mod linux;
#[path = "vmm_bench/memory.rs"]
mod memory;
#[path = "vmm_bench/probes.rs"]
mod probes;
#[path = "vmm_bench/profiler.rs"]
mod profiler;
#[path = "vmm_bench/readme.rs"]
mod readme;
#[path = "vmm_bench/report.rs"]
mod report;
#[path = "vmm_bench/sharing.rs"]
mod sharing;
#[path = "vmm_bench/snapshot.rs"]
mod snapshot;
#[path = "vmm_bench/tracking.rs"]
mod tracking;

use report::{Row, Target};

/// Benchmarks Mirrorball against a bare kvm-ioctls VM (and, opt-in, QEMU) in one run.
#[derive(Debug, Parser)]
#[command(name = "vmm_bench")]
struct Args {
    /// Also write the results as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Merge the results into vmm/benches/results.json and regenerate the README's benchmark
    /// table from it (the groups that ran replace their stored rows).
    #[arg(long)]
    update_readme: bool,
    /// The `vmm` binary [default: the one cargo built next to this benchmark].
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// Opt-in: boot this kernel and initramfs to init through the VMM and through QEMU.
    #[arg(long, num_args = 2, value_names = ["KERNEL", "INITRD"])]
    linux: Option<Vec<PathBuf>>,
    /// Kernel the VMM boots in --linux [default: KERNEL if it is an ELF, else a `vmlinux` next
    /// to it].
    #[arg(long, value_name = "PATH", requires = "linux")]
    vmm_kernel: Option<PathBuf>,
    /// Kernel QEMU boots in --linux [default: KERNEL if it is a bzImage, else a `bzImage` next
    /// to it].
    #[arg(long, value_name = "PATH", requires = "linux")]
    qemu_kernel: Option<PathBuf>,
    /// QEMU binary for --linux.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU `-cpu` model for --linux [default: QEMU's, or `qemu64,vendor=GenuineIntel` on a
    /// PVM host, the CPU vendor the VMM presents there].
    #[arg(long, value_name = "MODEL", requires = "linux")]
    qemu_cpu: Option<String>,
    /// Longest wait for each Linux boot, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    linux_timeout: u64,
    /// Samples per median for the launch benchmarks.
    #[arg(long, value_name = "N", default_value_t = 21)]
    runs: usize,
    /// Samples per median for the exit round-trip benchmarks.
    #[arg(long, value_name = "N", default_value_t = 7)]
    exit_runs: usize,
    /// Exits per guest run in the round-trip benchmarks.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    exits: u32,
    /// VMs kept alive at once for the RSS benchmark.
    #[arg(long, value_name = "K", default_value_t = 8)]
    vms: usize,
    /// Run only these groups: launch (1, 2), exits (3), rss (4), linux (5; also needs --linux),
    /// profiler (6), latency (7), dashboard (8), tracking (9), attribution (10), sharing (11),
    /// disk (12), snapshot (13), budget (14). Group names given as plain
    /// arguments (`cargo bench ... -- latency`) select groups too.
    #[arg(long, value_delimiter = ',', value_name = "GROUPS")]
    only: Vec<String>,
    /// Seconds each reader cadence of the latency benchmark runs.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    latency_secs: f64,
    /// Back-to-back pairs (tracking on, off) per vCPU count in the host-tracking benchmark.
    #[arg(long, value_name = "N", default_value_t = 11)]
    tracking_pairs: usize,
    /// Where the attribution group writes its error table (Markdown, for the README).
    #[arg(long, value_name = "PATH",
          default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/attribution-table.md"))]
    attribution_table: PathBuf,
    /// Seconds each dashboard measurement runs.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    dashboard_secs: f64,
    /// Internal: bare VM setup + one exit, then exit (the process-level baseline).
    #[arg(long, hide = true)]
    bare_first_exit: bool,
    /// Internal: with --bare-first-exit, also create the in-kernel irqchip and PIT.
    #[arg(long, hide = true)]
    irqchip: bool,
    /// Internal: with --bare-first-exit, print the process's non-guest RSS before exiting.
    #[arg(long, hide = true)]
    print_rss: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Filters passed by `cargo bench`: group names, as with --only.
    #[arg(hide = true)]
    filters: Vec<String>,
}

impl Args {
    fn wants(&self, group: &str) -> bool {
        let mut chosen = self.only.iter().chain(&self.filters).peekable();
        chosen.peek().is_none() || chosen.any(|g| g == group)
    }
}

/// The `vmm` binary: `--vmm`, else the one cargo built for this benchmark, else next to it.
fn find_vmm(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        if path.exists() {
            return Ok(path.to_path_buf());
        }
        bail!("--vmm {}: no such file", path.display());
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_vmm"));
    if built.exists() {
        return Ok(built);
    }
    let me = std::env::current_exe()?;
    // target/<profile>/deps/vmm_bench-<hash> → target/<profile>/vmm
    if let Some(path) = me.parent().and_then(Path::parent).map(|d| d.join("vmm")) {
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("no vmm binary found: build it with `cargo build -p vmm --release` or pass --vmm PATH")
}

fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm not available ({e})")),
    }
}

/// Runs one group; a failure becomes a skipped row instead of ending the whole run.
fn group(rows: &mut Vec<Row>, number: u8, name: &str, f: impl FnOnce() -> Result<Vec<Row>>) {
    eprintln!("vmm_bench: running {name}...");
    match f() {
        Ok(mut r) => rows.append(&mut r),
        Err(e) => {
            eprintln!("vmm_bench: {name} failed: {e:#}");
            rows.push(Row::skipped(
                number,
                name,
                name,
                Target::None,
                format!("failed: {e:#}"),
            ));
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let host = vmm::arch::x86_64::cpuid::HostKind::detect()
        .name()
        .to_string();
    let mut rows = Vec::new();
    if args.wants("disk") {
        group(&mut rows, 12, "disk", || {
            let dir = std::env::temp_dir().join(format!("vmm-bench-disk-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let rows = disk::run(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            rows
        });
    }
    if let Some(why) = kvm_unavailable() {
        println!("vmm_bench: skipped every benchmark: {why}");
        for (n, name) in [(1, "launch"), (3, "exits"), (4, "rss")] {
            rows.push(Row::skipped(n, name, name, Target::None, why.clone()));
        }
        // The dashboard needs no KVM for its fake VMs.
        if args.wants("dashboard") {
            group(&mut rows, 8, "dashboard", || {
                dashboard::run(None, args.dashboard_secs)
            });
        }
    } else {
        let vmm = find_vmm(args.vmm.as_deref())?;
        let me = std::env::current_exe().context("locating this benchmark binary")?;
        let scratch = guest::Scratch::new()?;
        eprintln!("vmm_bench: host KVM: {host}; vmm binary: {}", vmm.display());
        // RSS first: later benchmarks free memory the allocator would hand to new VMs.
        if args.wants("rss") {
            group(&mut rows, 4, "rss", || {
                memory::run(&scratch, &vmm, &me, args.vms)
            });
        }
        if args.wants("launch") {
            group(&mut rows, 1, "launch", || {
                launch::run(&launch::LaunchSetup {
                    vmm: &vmm,
                    me: &me,
                    scratch: &scratch,
                    runs: args.runs,
                })
            });
        }
        if args.wants("exits") {
            group(&mut rows, 3, "exits", || {
                exits::run(&scratch, args.exits, args.exit_runs)
            });
        }
        if args.wants("profiler") {
            group(&mut rows, 6, "profiler", || {
                profiler::run(&vmm, args.runs, args.exit_runs)
            });
        }
        if args.wants("latency") {
            group(&mut rows, 7, "latency", || latency::run(args.latency_secs));
        }
        if args.wants("dashboard") {
            group(&mut rows, 8, "dashboard", || {
                dashboard::run(Some(vmm.as_path()), args.dashboard_secs)
            });
        }
        if args.wants("attribution") {
            group(&mut rows, 10, "attribution", || {
                attribution::run_group(&args.attribution_table, args.tracking_pairs.min(5))
            });
        }
        if args.wants("tracking") {
            group(&mut rows, 9, "tracking", || {
                tracking::run(args.tracking_pairs)
            });
        }
        if args.wants("sharing") {
            group(&mut rows, 10, "sharing", || {
                sharing::run(&vmm, args.exit_runs)
            });
        }
        if args.wants("snapshot") {
            group(&mut rows, 13, "snapshot", || {
                snapshot::run(scratch.path(), &vmm)
            });
        }
        if args.wants("budget") {
            group(&mut rows, 14, "budget", || {
                budget::run(&vmm, args.exit_runs)
            });
        }
        match &args.linux {
            Some(paths) if args.wants("linux") => {
                let linux_args = linux::LinuxArgs {
                    kernel: paths[0].clone(),
                    initrd: paths[1].clone(),
                    vmm_kernel: args.vmm_kernel.clone(),
                    qemu_kernel: args.qemu_kernel.clone(),
                    qemu: args.qemu.clone(),
                    qemu_cpu: args.qemu_cpu.clone(),
                    timeout: Duration::from_secs(args.linux_timeout),
                };
                group(&mut rows, 5, "linux", || linux::run(&vmm, &linux_args));
            }
            _ => eprintln!("vmm_bench: Linux vs QEMU not run (opt-in: --linux KERNEL INITRD)"),
        }
    }
    rows.sort_by_key(|r| r.group);
    println!("## Mirrorball benchmarks (host KVM: {host})\n");
    print!("{}", report::markdown(&rows));
    if let Some(path) = &args.json {
        report::write_json(path, &host, &rows)?;
        eprintln!("vmm_bench: wrote {}", path.display());
    }
    if args.update_readme {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let results = root.join("benches/results.json");
        let readme = root.join("../README.md");
        readme::update(&results, &readme, &host, &rows)?;
        eprintln!(
            "vmm_bench: merged into {} and regenerated the table in {}",
            results.display(),
            readme.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.bare_first_exit {
        let irqchip = if args.irqchip {
            bare::Irqchip::BeforeMemslot
        } else {
            bare::Irqchip::None
        };
        return match launch::bare_first_exit_with(irqchip) {
            Ok(_) => {
                if args.print_rss {
                    memory::print_own_rss();
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmm_bench --bare-first-exit: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm_bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
