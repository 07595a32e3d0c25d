//! Benchmark 3: the cost of one exit round trip (guest `out`/MMIO write → KVM_RUN returns →
//! the exit is handled → KVM_RUN again), through the VMM and through the bare loop.
//!
//! Each measurement is the wall time of a whole run (build, run to the guest's reset, teardown)
//! of a guest doing N exits. The per-exit cost is the slope between a run with N exits and one
//! with N/10, so that fixed costs (VM creation, thread start and stop) cancel out; both sides
//! run the identical guest code with the identical method.
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirrorball_profiler::thread_usage::ThreadUsage;
use vmm::builder::linux;
use vmm::exit::VmEnd;
use vmm::session::{self, SessionOptions};

use super::bare::{BareVm, Irqchip};
use super::guest::{self, ExitKind, Scratch, EXIT_PORT, MMIO_ADDR};
use super::launch::TINY_MEM_BYTES;
use super::report::{median, spread, Row, Target};

static NEVER_INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// One guest run: wall time, CPU time of the whole process (all threads), exits of the measured
/// kind that were seen, and for the VMM its own accounting of time per exit (KVM_RUN + VMM time
/// of the vCPU thread / its exits).
struct Sample {
    wall: Duration,
    cpu: Duration,
    seen: u64,
    accounted_us_per_exit: f64,
}

fn process_cpu() -> Result<Duration> {
    let u = ThreadUsage::process().map_err(|e| anyhow::anyhow!("getrusage: {e}"))?;
    Ok(u.user + u.system)
}

fn vmm_run(elf: &Path, kind: ExitKind) -> Result<Sample> {
    let cpu0 = process_cpu()?;
    let start = Instant::now();
    let config = guest::tiny_linux_config(elf);
    let built = linux::build(
        &config,
        vmm::builder::ConsoleSink::Null,
        &vmm::profiling::regions::run_dir(),
    )
    .context("building the VM")?;
    let report = session::run(
        built,
        SessionOptions {
            timeout: Some(Duration::from_secs(120)),
            interrupted: &NEVER_INTERRUPTED,
            console_input: false,
            keep_regions: None,
        },
    )?;
    let wall = start.elapsed();
    let cpu = process_cpu()?.saturating_sub(cpu0);
    if report.end_reason != VmEnd::GuestReset {
        bail!("exit-loop guest ended with: {}", report.end_reason);
    }
    let key = match kind {
        ExitKind::Pio => "pio",
        ExitKind::Mmio => "mmio",
    };
    let vcpu = report.vcpus.first().context("no vCPU report")?;
    Ok(Sample {
        wall,
        cpu,
        seen: report.unhandled_exits.get(key).copied().unwrap_or(0),
        accounted_us_per_exit: (vcpu.kvm_run_ns + vcpu.vmm_ns) as f64
            / vcpu.total_exits.max(1) as f64
            / 1e3,
    })
}

fn bare_run(code: &[u8], kind: ExitKind, irqchip: Irqchip) -> Result<Sample> {
    let cpu0 = process_cpu()?;
    let start = Instant::now();
    let mut vm = BareVm::with_irqchip(
        usize::try_from(TINY_MEM_BYTES).expect("fits"),
        code,
        irqchip,
    )?;
    let counts = vm.run_to_reset()?;
    drop(vm);
    let wall = start.elapsed();
    let cpu = process_cpu()?.saturating_sub(cpu0);
    Ok(Sample {
        wall,
        cpu,
        seen: match kind {
            ExitKind::Pio => counts.pio,
            ExitKind::Mmio => counts.mmio,
        },
        accounted_us_per_exit: f64::NAN,
    })
}

/// The three ways the same guest is run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Ours,
    Bare,
    BareIrqchip,
}

/// Per-exit slopes of one side: wall µs, CPU µs, and the VMM's accounting (ours only).
#[derive(Default)]
struct Slopes {
    wall: Vec<f64>,
    cpu: Vec<f64>,
    accounted: Vec<f64>,
}

struct Guests {
    kind: ExitKind,
    big: u32,
    small: u32,
    big_code: Vec<u8>,
    small_code: Vec<u8>,
    big_elf: PathBuf,
    small_elf: PathBuf,
}

impl Guests {
    fn new(scratch: &Scratch, kind: ExitKind, exits: u32) -> Result<Self> {
        let small = (exits / 10).max(1);
        let big_code = guest::exit_loop(kind, exits);
        let small_code = guest::exit_loop(kind, small);
        let tag = match kind {
            ExitKind::Pio => "pio",
            ExitKind::Mmio => "mmio",
        };
        Ok(Self {
            kind,
            big: exits,
            small,
            big_elf: scratch.file(&format!("{tag}-big.elf"), &guest::elf(&big_code))?,
            small_elf: scratch.file(&format!("{tag}-small.elf"), &guest::elf(&small_code))?,
            big_code,
            small_code,
        })
    }

    fn run(&self, side: Side, big: bool) -> Result<Sample> {
        let (elf, code, want) = if big {
            (&self.big_elf, &self.big_code, self.big)
        } else {
            (&self.small_elf, &self.small_code, self.small)
        };
        let sample = match side {
            Side::Ours => vmm_run(elf, self.kind)?,
            Side::Bare => bare_run(code, self.kind, Irqchip::None)?,
            Side::BareIrqchip => bare_run(code, self.kind, Irqchip::BeforeMemslot)?,
        };
        if sample.seen != u64::from(want) {
            bail!("expected {want} exits, saw {}", sample.seen);
        }
        Ok(sample)
    }

    /// One slope for `side`: (long run − short run) / (exits difference).
    fn slope(&self, side: Side, into: &mut Slopes) -> Result<()> {
        let b = self.run(side, true)?;
        let s = self.run(side, false)?;
        let n = f64::from(self.big - self.small);
        into.wall
            .push((b.wall.as_secs_f64() - s.wall.as_secs_f64()) * 1e6 / n);
        into.cpu
            .push((b.cpu.as_secs_f64() - s.cpu.as_secs_f64()) * 1e6 / n);
        if side == Side::Ours {
            into.accounted.push(b.accounted_us_per_exit);
        }
        Ok(())
    }
}

/// Slopes of (ours, bare, bare + irqchip) for one kind, the sides' order rotating per rep
/// against drift in the host's load.
fn measure(guests: &Guests, runs: usize) -> Result<[Slopes; 3]> {
    let sides = [Side::Ours, Side::Bare, Side::BareIrqchip];
    // Warm-up (page cache, code paths), not counted.
    for side in sides {
        guests.run(side, false)?;
    }
    let mut out: [Slopes; 3] = Default::default();
    for rep in 0..runs {
        for i in 0..sides.len() {
            let which = (i + rep) % sides.len();
            guests.slope(sides[which], &mut out[which])?;
        }
    }
    Ok(out)
}

/// Benchmark 3 for port I/O and MMIO.
pub fn run(scratch: &Scratch, exits: u32, runs: usize) -> Result<Vec<Row>> {
    let exits = exits.max(20);
    let runs = runs.max(1);
    let mut rows = Vec::new();
    for kind in [ExitKind::Pio, ExitKind::Mmio] {
        let guests = Guests::new(scratch, kind, exits)?;
        let [ours, bare, irqchip] = measure(&guests, runs)?;
        let what = match kind {
            ExitKind::Pio => format!("`out dx, al` to unclaimed port {EXIT_PORT:#x}"),
            ExitKind::Mmio => format!("byte write to unbacked GPA {MMIO_ADDR:#x}"),
        };
        rows.push(Row::measured(
            3,
            match kind {
                ExitKind::Pio => "exit_round_trip_pio",
                ExitKind::Mmio => "exit_round_trip_mmio",
            },
            &format!("exit round trip, {} (per exit)", kind.name()),
            "µs",
            median(&ours.wall),
            "bare KVM_RUN loop",
            Some(median(&bare.wall)),
            Target::RatioAtMost { value: 1.2 },
            format!(
                "median of {runs} slopes (wall of a {}-exit run − wall of a {}-exit run) / {} \
                 exits, sides interleaved; CPL0 64-bit guest doing {what} (100 per loop \
                 iteration); ours = builder::linux::build + session::run (vCPU thread, bus \
                 dispatch, exit accounting; range {} µs), bare = kvm-ioctls loop on the calling \
                 thread, no irqchip (range {} µs); bare + in-kernel irqchip/PIT: {:.2} µs \
                 (CPU time {:.2} µs); the VMM's own accounting (KVM_RUN + VMM time / exits) says {:.2} µs/exit",
                guests.big,
                guests.small,
                guests.big - guests.small,
                spread(&ours.wall, 2),
                spread(&bare.wall, 2),
                median(&irqchip.wall),
                median(&irqchip.cpu),
                median(&ours.accounted)
            ),
        ));
        rows.push(Row::measured(
            3,
            match kind {
                ExitKind::Pio => "exit_cpu_pio",
                ExitKind::Mmio => "exit_cpu_mmio",
            },
            &format!(
                "exit round trip, {} (process CPU time per exit)",
                kind.name()
            ),
            "µs",
            median(&ours.cpu),
            "bare KVM_RUN loop",
            Some(median(&bare.cpu)),
            Target::RatioAtMost { value: 1.2 },
            format!(
                "same runs as the row above, slopes of the process's user + system CPU time \
                 (getrusage RUSAGE_SELF, all threads) instead of wall time: less sensitive to \
                 other load on the host; ranges: ours {} µs, bare {} µs",
                spread(&ours.cpu, 2),
                spread(&bare.cpu, 2)
            ),
        ));
    }
    Ok(rows)
}
