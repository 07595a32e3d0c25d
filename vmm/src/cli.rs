//! The `vmm` command line: options, size parsing, and turning them into a guest to build.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::builder::linux::{LinuxConfig, DEFAULT_MEM_BYTES};
use crate::builder::MAX_VCPUS;
use crate::builder::{GuestConfig, WorkloadConfig};
use crate::fleet::ShareMode;
use crate::session::SnapshotWhen;
use crate::workload::TaskSpec;

/// Tasks of the embedded default job: one random-access and one locality task, so a first run
/// shows how differently they fault.
pub const DEFAULT_WORKLOAD: [&str; 2] = ["work 64 R 100000", "work 64 L 100000"];

/// Mirrorball: run a Linux guest or the embedded OS-less workload guest on KVM, and account for
/// exits, faults and CPU time on the host side.
///
/// With no --kernel and no --workload, runs the embedded default workload. The subcommands watch
/// VMs that are already running (their profiler regions in the run directory).
#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// A profile consumer to run instead of a VM.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Linux kernel to boot: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long, value_name = "STR", requires = "kernel")]
    pub cmdline: Option<String>,
    /// Guest RAM, e.g. 256M or 1G (a bare number is MiB) [default: 256M for Linux, what the
    /// workload needs otherwise].
    #[arg(long, value_name = "SIZE", value_parser = parse_mem)]
    pub mem: Option<u64>,
    /// Number of vCPUs [default: 1 for Linux; one per workload task].
    #[arg(long, value_name = "N", value_parser = parse_vcpus)]
    pub vcpus: Option<usize>,
    /// OS-less workload task "work <MiB> <R|L> <accesses> [iterations]"; repeat for several
    /// tasks (one vCPU each, or shared round robin on --vcpus N), or give one with --vcpus N
    /// for N copies.
    #[arg(long, value_name = "SPEC", conflicts_with = "kernel")]
    pub workload: Vec<TaskSpec>,
    /// Copy-on-write disk "base.img[,overlay=PATH]" (virtio-blk, /dev/vda in the guest): the
    /// base image is only read; writes go to a private overlay per VM, in memory or a new
    /// sparse file PATH (PATH.NAME for each VM of --vms N).
    #[arg(long, value_name = "SPEC", requires = "kernel")]
    pub disk: Option<String>,
    /// Run N copies of the guest in this process (named vm0, vm1, …), their memory private
    /// copy-on-write views of one template unless --share none.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vms: usize,
    /// How the VMs' memory is shared: template (the default for --vms > 1) or none.
    #[arg(long, value_name = "MODE")]
    pub share: Option<ShareMode>,
    /// Start the VM(s) from a snapshot directory (`vmm ctl NAME snapshot DIR`): with --vms N,
    /// N copy-on-write clones of it (exit code 22 when the snapshot is refused).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "workload", "mem", "vcpus", "share"])]
    pub restore: Option<PathBuf>,
    /// With --restore: give each clone memory of its own, loaded from the snapshot's memory
    /// file page by page on first touch through userfaultfd (counted per VM as lazy loads;
    /// needs root), instead of mapping that file copy-on-write for all clones to share.
    #[arg(long)]
    pub lazy: bool,
    /// Take a snapshot of the VM after it ran SECS seconds, into DIR (with --vms N, into
    /// DIR/NAME for each VM); the VM runs on.
    #[arg(long, num_args = 2, value_names = ["SECS", "DIR"], conflicts_with = "snapshot_on")]
    pub snapshot_after: Vec<String>,
    /// Take a snapshot of a Linux VM when its console prints a line containing TEXT (at most
    /// 256 bytes), into DIR (with --vms N, DIR/NAME); the VM runs on.
    #[arg(long, num_args = 2, value_names = ["TEXT", "DIR"])]
    pub snapshot_on: Vec<String>,
    /// How the VMs run and report.
    #[command(flatten)]
    pub run: RunOptions,
}

impl Cli {
    /// `--snapshot-after SECS DIR` or `--snapshot-on TEXT DIR`, checked.
    pub fn snapshot_trigger(&self) -> Result<Option<(SnapshotWhen, PathBuf)>, String> {
        if let [text, dir] = self.snapshot_on.as_slice() {
            let ok = (1..=mirrorball_devices::serial::watch::MAX_WATCH_TEXT).contains(&text.len())
                && !text.contains(['\n', '\r']);
            if !ok {
                return Err("--snapshot-on: TEXT must be 1 to 256 bytes on one line".into());
            }
            return Ok(Some((
                SnapshotWhen::OnSerial(text.clone()),
                PathBuf::from(dir),
            )));
        }
        match self.snapshot_after.as_slice() {
            [] => Ok(None),
            [secs, dir] => {
                let secs: f64 = secs
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s < 1e9)
                    .ok_or_else(|| {
                        format!("--snapshot-after: {secs:?} is not a number of seconds")
                    })?;
                Ok(Some((
                    SnapshotWhen::After(Duration::from_secs_f64(secs)),
                    PathBuf::from(dir),
                )))
            }
            _ => Err("--snapshot-after takes SECS and DIR".into()),
        }
    }
}

/// Options of every command that runs VMs (`vmm …` and `vmm fleet FILE`).
#[derive(Debug, Args)]
pub struct RunOptions {
    /// Write per-vCPU exit, fault and CPU accounting as JSON at exit ("-" for stdout); a fleet
    /// writes {"vms": [one object per VM]}.
    #[arg(long, value_name = "PATH")]
    pub stats: Option<String>,
    /// Profiler sampling rate in Hz (the host sampler, and the guest's default period); 0 turns
    /// the profiler off.
    #[arg(long, value_name = "HZ", default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub sample_hz: u32,
    /// Directory where the profiler regions are published [default: $MIRRORBALL_RUN_DIR or
    /// /dev/shm/mirrorball].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// How host figures are charged to guest tasks: "exact" closes each task's interval at
    /// every task switch the guest announces (and at ticks); "sampled" charges each tick's
    /// interval to the task running at the tick.
    #[arg(long, value_name = "MODE", default_value = "exact")]
    pub attribution: crate::profiling::sampler::AttributionMode,
    /// End each VM after this many seconds (exit code 7).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Offer guest memory to the kernel's same-page merging (needs /sys/kernel/mm/ksm/run = 1).
    #[arg(long)]
    pub ksm: bool,
    /// Where the serial consoles of several Linux VMs are logged, one NAME.log each.
    #[arg(long, value_name = "DIR", default_value = "vmm-logs")]
    pub log_dir: PathBuf,
    // Machine-memory budget (`vmm::budget`): --machine-mem, --swap.
    #[command(flatten)]
    pub budget: crate::budget::BudgetArgs,
    // Gates (`vmm::gates`, README "Gates"): --expect, --baseline, --junit.
    #[command(flatten)]
    pub gates: crate::gates::GateArgs,
}

/// Profile consumers: they attach to running VMs through the run directory (default
/// `/dev/shm/mirrorball`, or `$MIRRORBALL_RUN_DIR`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write every guest and host profiler sample of a running VM (one row per sample).
    Record(RecordArgs),
    /// Plot records: faults vs time per task; utilisation vs number of tasks for several.
    Plot(PlotArgs),
    /// Live view of every running VM: per VM, vCPU and guest task fault and CPU rates.
    Top(TopArgs),
    /// Per VM / vCPU / task counters in the Prometheus text format (once, or served).
    Prometheus(PrometheusArgs),
    /// Compare two --stats files figure by figure (exit code 12 when one regressed).
    Diff(crate::gates::diff::DiffArgs),
    /// Case studies over many runs: `vmm study thrash` (see vmm/src/study).
    Study(crate::study::StudyArgs),
    /// Run the VMs a fleet file describes (TOML: one [[vm]] per VM; see vmm/src/fleet/file.rs).
    Fleet(FleetArgs),
    /// Drive a running VM through its control socket: status, pause, resume, stop, snapshot DIR
    /// (protocol: vmm/CONTROL.md; exit code 20 = no such VM, 21 = the VM refused).
    Ctl(CtlArgs),
}

/// `vmm ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VM: its name (as `vmm top` shows it) or its id `PID-N`.
    pub name: String,
    /// status, pause, resume, stop or snapshot.
    #[arg(value_parser = ["status", "pause", "resume", "stop", "snapshot"])]
    pub command: String,
    /// The snapshot directory (snapshot only).
    pub dir: Option<PathBuf>,
    /// Run directory [default: $MIRRORBALL_RUN_DIR or /dev/shm/mirrorball].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Seconds to wait for the reply.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
}

/// `vmm fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// The fleet file.
    #[arg(value_name = "FILE.toml")]
    pub file: PathBuf,
    /// How the VMs run and report.
    #[command(flatten)]
    pub run: RunOptions,
}

/// `vmm record`.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Run directory [default: $MIRRORBALL_RUN_DIR or /dev/shm/mirrorball].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// The VM to record, as PID-N (needed when several run).
    #[arg(long, value_name = "PID-N")]
    pub vm: Option<mirrorball_monitor::VmId>,
    /// Output format: csv or jsonl.
    #[arg(long, value_name = "FORMAT", default_value = "csv")]
    pub format: mirrorball_monitor::record::Format,
    /// Output file ("-" for standard output).
    #[arg(long, short, value_name = "PATH", default_value = "-")]
    pub output: PathBuf,
    /// Stop after this many seconds [default: when the VM ends, or on Ctrl-C].
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub duration: Option<Duration>,
    /// Wait up to this many seconds for the VM to appear [default: it must be running].
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub wait: Option<Duration>,
}

/// `vmm plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// A record written by `vmm record`; repeat for the utilisation-vs-tasks plot.
    #[arg(long, short, value_name = "RECORD", required = true)]
    pub input: Vec<PathBuf>,
    /// Output prefix [default: the input without extension; "mirrorball" beside the first
    /// input for several].
    #[arg(long, short, value_name = "PREFIX")]
    pub output: Option<PathBuf>,
    /// png, svg or both.
    #[arg(long, value_name = "FORMAT", default_value = "png")]
    pub format: mirrorball_monitor::plot::ImageFormat,
    /// TrueType font for the text [default: $MIRRORBALL_PLOT_FONT, else DejaVu Sans or
    /// Liberation Sans if installed, else no text].
    #[arg(long, value_name = "TTF")]
    pub font: Option<PathBuf>,
}

/// `vmm top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Run directory [default: $MIRRORBALL_RUN_DIR or /dev/shm/mirrorball].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Refresh interval in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub interval: u64,
}

/// `vmm prometheus`.
#[derive(Debug, Args)]
pub struct PrometheusArgs {
    /// Run directory [default: $MIRRORBALL_RUN_DIR or /dev/shm/mirrorball].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Write the exposition once to this file ("-" for standard output).
    #[arg(long, short, value_name = "PATH", conflicts_with = "listen")]
    pub output: Option<PathBuf>,
    /// Serve /metrics on this loopback address, e.g. 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// How often the VMs are polled while serving, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(50..=600_000))]
    pub interval: u64,
}

/// Parses a size: a number with an optional K, M, G or T suffix (binary units, optional "iB"
/// or "B"); a bare number means MiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 512M, 2G)"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?} has an unknown unit (use K, M, G or T)")),
    };
    if value == 0 {
        return Err("size must be greater than 0".into());
    }
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses `--mem`: a size of at least 1 MiB (guest RAM is counted in MiB).
fn parse_mem(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes < 1 << 20 {
        return Err(format!("{text:?} is less than 1 MiB"));
    }
    Ok(bytes)
}

/// Parses `--vcpus`: checked against [`MAX_VCPUS`] before anything is sized by it.
fn parse_vcpus(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(format!("must be between 1 and {MAX_VCPUS}")),
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs < 1e9) {
        return Err("timeout must be a positive number of seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

impl RunOptions {
    /// The profiler's sampling period, `None` when it is off.
    pub fn sample_period(&self) -> Option<Duration> {
        (self.sample_hz > 0)
            .then(|| Duration::from_nanos(1_000_000_000 / u64::from(self.sample_hz)))
    }

    /// Where profiler regions are published.
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(crate::profiling::regions::run_dir)
    }
}

impl Cli {
    /// `--disk`, parsed, its base opened and its overlay paths checked for every VM.
    fn disk(&self) -> Result<Option<crate::builder::disk::DiskSpec>, String> {
        let Some(text) = &self.disk else {
            return Ok(None);
        };
        let mut spec = crate::builder::disk::DiskSpec::parse(text, self.vms > 1)?;
        spec.map_vms = self.vms;
        let names: Vec<String> = (0..self.vms).map(|i| format!("vm{i}")).collect();
        spec.check_overlays(names.iter().map(String::as_str))?;
        Ok(Some(spec))
    }

    /// Resolves the options into a guest to build.
    pub fn guest(&self) -> Result<GuestConfig, String> {
        if self.lazy {
            // Checked here: clap's `requires` lets a flag through without it.
            return Err("--lazy goes only with --restore".into());
        }
        if let Some(kernel) = &self.kernel {
            return Ok(GuestConfig::Linux(LinuxConfig {
                kernel: kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
                mem_bytes: self.mem.unwrap_or(DEFAULT_MEM_BYTES),
                vcpus: self.vcpus.unwrap_or(1),
                profile_period: self.run.sample_period(),
                disk: self.disk()?,
            }));
        }
        if self.initrd.is_some() || self.cmdline.is_some() {
            return Err(
                "--initrd and --cmdline need --kernel (the workload guest has neither)".into(),
            );
        }
        let parse_default = || {
            DEFAULT_WORKLOAD
                .iter()
                .map(|s| s.parse().map_err(|e| format!("{e}")))
                .collect::<Result<Vec<TaskSpec>, String>>()
        };
        let (specs, vcpus) = match (self.workload.as_slice(), self.vcpus) {
            ([], None) => {
                let specs = parse_default()?;
                let n = specs.len();
                (specs, n)
            }
            ([], Some(n)) => (
                parse_default()?.iter().cycle().take(n).copied().collect(),
                n,
            ),
            ([one], Some(n)) => (vec![*one; n], n),
            (many, Some(n)) if n > many.len() => {
                return Err(format!(
                    "--vcpus {n} is more than the {} --workload tasks (every vCPU needs a task)",
                    many.len()
                ))
            }
            (many, Some(n)) => (many.to_vec(), n),
            (many, None) => (many.to_vec(), many.len()),
        };
        Ok(GuestConfig::Workload(WorkloadConfig {
            specs,
            vcpus,
            mem_bytes: self.mem,
            profile_period: self.run.sample_period(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmm").chain(args.iter().copied()))
    }

    #[test]
    fn lazy_goes_only_with_restore() {
        let lone = cli(&["--workload", "work 1 R 1 1", "--lazy"]).expect("parses");
        let e = lone.guest().expect_err("no --restore");
        assert!(e.contains("--restore"), "{e}");
        assert!(cli(&["--restore", "snap", "--lazy"]).is_ok_and(|c| c.lazy));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        for bad in ["", "0", "0M", "x", "12Q", "-1G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ranges_are_checked_before_anything_is_sized() {
        for bad in ["0", "65", "1000000000", "4294967296", "x"] {
            let e = cli(&["--vcpus", bad]).expect_err(bad).to_string();
            assert!(e.contains("between 1 and 64"), "{bad}: {e}");
        }
        assert!(cli(&["--vcpus", "64"]).is_ok());
        let e = cli(&["--mem", "1K"]).expect_err("1K").to_string();
        assert!(e.contains("less than 1 MiB"), "{e}");
        for args in [
            &["--workload", "work 1 R 1", "--cmdline", "x"][..],
            &["--workload", "work 1 R 1", "--initrd", "/i"][..],
            &["--cmdline", "x"][..],
        ] {
            let e = cli(args)
                .map_err(|e| e.to_string())
                .and_then(|c| c.guest().map(|_| ()));
            assert!(e.is_err_and(|e| e.contains("--kernel")), "{args:?}");
        }
    }

    #[test]
    fn default_job_is_two_tasks() {
        let GuestConfig::Workload(WorkloadConfig {
            specs, mem_bytes, ..
        }) = cli(&[]).expect("cli").guest().expect("guest")
        else {
            panic!("expected the workload");
        };
        assert_eq!(specs.len(), 2);
        assert_eq!(mem_bytes, None);
        let GuestConfig::Workload(WorkloadConfig { specs, .. }) =
            cli(&["--vcpus", "3"]).expect("cli").guest().expect("guest")
        else {
            panic!("expected the workload");
        };
        assert_eq!(specs.len(), 3);
    }

    #[test]
    fn one_spec_is_copied_per_vcpu_and_tasks_share_vcpus() {
        let c = cli(&["--workload", "work 8 L 100", "--vcpus", "4"]).expect("cli");
        let GuestConfig::Workload(WorkloadConfig { specs, .. }) = c.guest().expect("guest") else {
            panic!("expected the workload");
        };
        assert_eq!(specs.len(), 4);
        let c = cli(&[
            "--workload",
            "work 8 L 100",
            "--workload",
            "work 8 R 1",
            "--vcpus",
            "3",
        ])
        .expect("cli");
        assert!(c.guest().unwrap_err().contains("every vCPU needs a task"));
        let c = cli(&[
            "--workload",
            "work 8 L 100",
            "--workload",
            "work 8 R 1",
            "--vcpus",
            "1",
        ])
        .expect("cli");
        let GuestConfig::Workload(WorkloadConfig { specs, vcpus, .. }) = c.guest().expect("guest")
        else {
            panic!("expected the workload");
        };
        assert_eq!((specs.len(), vcpus), (2, 1));
    }

    #[test]
    fn linux_options() {
        let c = cli(&[
            "--kernel", "/k", "--initrd", "/i", "--mem", "512M", "--vcpus", "2",
        ])
        .expect("cli");
        let GuestConfig::Linux(l) = c.guest().expect("guest") else {
            panic!("expected linux");
        };
        assert_eq!((l.mem_bytes, l.vcpus), (512 << 20, 2));
        assert!(cli(&["--initrd", "/i"]).is_err(), "initrd needs a kernel");
        assert!(cli(&["--kernel", "/k", "--workload", "work 1 R 1"]).is_err());
        assert!(cli(&["--workload", "work 0 R 1"]).is_err());
        assert!(cli(&["--timeout", "-3"]).is_err());
        assert!(cli(&["--mem", "0"]).is_err());
    }

    #[test]
    fn fleets() {
        let c = cli(&["--vms", "8", "--share", "none", "--ksm"]).expect("cli");
        assert_eq!(
            (c.vms, c.share, c.run.ksm),
            (8, Some(ShareMode::None), true)
        );
        assert!(cli(&["--share", "some"]).is_err());
        let c = cli(&["fleet", "f.toml", "--stats", "-", "--timeout", "5"]).expect("cli");
        let Some(Command::Fleet(f)) = c.command else {
            panic!("expected fleet");
        };
        assert_eq!(f.file, PathBuf::from("f.toml"));
        assert_eq!(f.run.stats.as_deref(), Some("-"));
        assert!(cli(&["fleet"]).is_err(), "fleet needs a file");
    }

    #[test]
    fn no_subcommand_still_runs_a_vm() {
        assert!(cli(&[]).expect("cli").command.is_none());
        assert!(cli(&["--kernel", "/k"]).expect("cli").command.is_none());
    }

    #[test]
    fn subcommands() {
        let c = cli(&[
            "record",
            "--vm",
            "12-0",
            "--format",
            "jsonl",
            "-o",
            "/tmp/x",
            "--duration",
            "2",
        ])
        .expect("cli");
        let Some(Command::Record(r)) = c.command else {
            panic!("expected record");
        };
        assert_eq!(r.vm, Some(mirrorball_monitor::VmId { pid: 12, n: 0 }));
        assert_eq!(r.format, mirrorball_monitor::record::Format::Jsonl);
        assert_eq!(r.duration, Some(Duration::from_secs(2)));
        let c = cli(&[
            "plot", "--input", "a.csv", "--input", "b.csv", "--format", "both",
        ])
        .expect("cli");
        let Some(Command::Plot(p)) = c.command else {
            panic!("expected plot");
        };
        assert_eq!(p.input.len(), 2);
        let c = cli(&["top", "--interval", "250", "--run-dir", "/r"]).expect("cli");
        let Some(Command::Top(t)) = c.command else {
            panic!("expected top");
        };
        assert_eq!((t.interval, t.run_dir), (250, Some(PathBuf::from("/r"))));
        let c = cli(&["prometheus", "--listen", "127.0.0.1:9477"]).expect("cli");
        assert!(matches!(c.command, Some(Command::Prometheus(_))));
        assert!(cli(&["plot"]).is_err(), "plot needs an input");
        assert!(cli(&["record", "--vm", "x"]).is_err());
        assert!(cli(&["record", "--format", "xml"]).is_err());
        assert!(cli(&["top", "--interval", "1"]).is_err());
        assert!(cli(&["prometheus", "-o", "-", "--listen", "127.0.0.1:1"]).is_err());
        assert!(
            cli(&["--mem", "1G", "top"]).is_err(),
            "VM options do not mix with tools"
        );
    }
}
