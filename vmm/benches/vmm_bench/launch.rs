//! Benchmarks 1 and 2: from nothing to the guest's first exit (in process and as a process), and
//! a whole `vmm` process running the smallest OS-less workload.
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmm::builder::linux;
use vmm::builder::{BuiltVm, Guest};
use vmm::exit::VmEnd;
use vmm::runner;

use super::bare::{BareVm, Irqchip};
use super::guest::{self, Scratch};
use super::report::{median, spread, Row, Target};

/// Guest RAM of the tiny guests, VMM and bare alike (populated lazily in both).
pub const TINY_MEM_BYTES: u64 = 128 << 20;

/// The `vmm` arguments that boot the tiny guest at `elf`.
pub fn tiny_guest_args(elf: &Path) -> Vec<String> {
    vec![
        "--kernel".into(),
        elf.display().to_string(),
        "--mem".into(),
        format!("{}M", TINY_MEM_BYTES >> 20),
    ]
}

/// Waits until `fd` is readable, for at most `timeout`.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out after {timeout:?} waiting for the guest");
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call, and the count is 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).context("poll");
            }
        }
    }
}

/// Builds the tiny reset guest through `builder::linux::build`, starts its vCPU thread, and
/// returns the time until the VMM's i8042 model signalled the guest's reset (the guest's first
/// `out`), and the part of it spent in `build`. The VM is torn down afterwards, outside the
/// measurement.
pub fn vmm_first_exit(elf: &Path) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let config = guest::tiny_linux_config(elf);
    let BuiltVm {
        vm,
        vcpus,
        control,
        guest,
        ..
    } = linux::build(
        &config,
        vmm::builder::ConsoleSink::Null,
        &vmm::profiling::regions::run_dir(),
    )
    .context("building the VM")?;
    let built = start.elapsed();
    let Guest::Linux { .. } = &guest else {
        bail!("the Linux builder returned another kind of guest");
    };
    // The vCPU consumes the i8042's reset and ends the VM: the VM's end is what to wait for.
    let ended = control.clone();
    let running = runner::start(vcpus, control).context("starting the vCPU")?;
    let waited = wait_readable(ended.wake_fd().as_raw_fd(), Duration::from_secs(10));
    let elapsed = start.elapsed();
    running.stop(VmEnd::Interrupted);
    drop(guest);
    drop(vm);
    waited.map(|()| (elapsed, built))
}

/// The bare kvm-ioctls setup of the same guest, run on the calling thread to its first exit;
/// with `irqchip`, the VM also gets the in-kernel interrupt controllers and PIT.
pub fn bare_first_exit_with(irqchip: Irqchip) -> Result<Duration> {
    let code = guest::reset_then_halt();
    let start = Instant::now();
    let mut vm = BareVm::with_irqchip(
        usize::try_from(TINY_MEM_BYTES).expect("fits"),
        &code,
        irqchip,
    )?;
    vm.run_to_first_exit()?;
    Ok(start.elapsed())
}

/// [`bare_first_exit_with`] without an irqchip: the baseline.
pub fn bare_first_exit() -> Result<Duration> {
    bare_first_exit_with(Irqchip::None)
}

/// Runs `cmd` to its end with all output captured; returns its wall time. Fails unless it exits
/// with code 0.
pub fn spawn_timed(cmd: &mut Command) -> Result<Duration> {
    cmd.stdin(Stdio::null());
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(elapsed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Paths and counts the launch benchmarks need.
pub struct LaunchSetup<'a> {
    /// The `vmm` binary.
    pub vmm: &'a Path,
    /// This benchmark binary (re-executed with `--bare-first-exit`).
    pub me: &'a Path,
    /// Where to put the tiny guest.
    pub scratch: &'a Scratch,
    /// Samples per median.
    pub runs: usize,
}

/// Benchmark 1 (in process and as processes) and 2.
pub fn run(setup: &LaunchSetup<'_>) -> Result<Vec<Row>> {
    let elf: PathBuf = setup
        .scratch
        .file("reset.elf", &guest::elf(&guest::reset_then_halt()))?;
    let runs = setup.runs.max(1);
    let mut rows = Vec::new();

    // In process: alternate ours and bare, after one warm-up of each.
    vmm_first_exit(&elf)?;
    bare_first_exit()?;
    bare_first_exit_with(Irqchip::BeforeMemslot)?;
    bare_first_exit_with(Irqchip::AfterMemslot)?;
    let (mut ours, mut ours_build, mut bare, mut bare_irqchip, mut bare_irqchip_after) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (total, build) = vmm_first_exit(&elf)?;
        ours.push(ms(total));
        ours_build.push(ms(build));
        bare.push(ms(bare_first_exit()?));
        bare_irqchip.push(ms(bare_first_exit_with(Irqchip::BeforeMemslot)?));
        bare_irqchip_after.push(ms(bare_first_exit_with(Irqchip::AfterMemslot)?));
    }
    let ours_note = format!(
        "ours = builder::linux::build (tiny ELF, 128 MiB, in-kernel irqchip + PIT, CPUID, MSRs, \
         devices; median {:.3} ms of the total) + vCPU thread start until the i8042 reset eventfd \
         fires (range {}, min {:.3} ms)",
        median(&ours_build),
        spread(&ours, 3),
        min(&ours)
    );
    rows.push(Row::measured(
        1,
        "launch_first_exit_in_process",
        "launch → first guest exit, in process",
        "ms",
        median(&ours),
        "bare kvm-ioctls",
        Some(median(&bare)),
        Target::OursAtMost { value: 3.0 },
        format!(
            "median of {runs}, interleaved; {ours_note}; bare = VM + 128 MiB memslot + vCPU + \
             long-mode registers + KVM_RUN to the `out` exit on the calling thread (range {}, \
             min {:.3} ms)",
            spread(&bare, 3),
            min(&bare)
        ),
    ));
    rows.push(Row::measured(
        1,
        "launch_first_exit_in_process_vs_irqchip",
        "launch → first guest exit, in process, vs bare + irqchip",
        "ms",
        median(&ours),
        "bare + irqchip",
        Some(median(&bare_irqchip)),
        Target::None,
        format!(
            "same runs as the row above; baseline = the bare setup plus KVM_CREATE_IRQCHIP and \
             KVM_CREATE_PIT2 before the memslot, in the VMM's order (range {}, min {:.3} ms): \
             what is left is the VMM's own share; the same bare VM with the irqchip and PIT \
             created after the memslot instead: median {:.3} ms (range {})",
            spread(&bare_irqchip, 3),
            min(&bare_irqchip),
            median(&bare_irqchip_after),
            spread(&bare_irqchip_after, 3)
        ),
    ));

    // As processes: `vmm --kernel tiny.elf`, the bare re-exec (without and with an irqchip),
    // `vmm --workload "work 1 R 1 1"`, interleaved.
    let tiny_args = tiny_guest_args(&elf);
    let mut vmm_tiny = Command::new(setup.vmm);
    vmm_tiny.args(&tiny_args);
    let mut vmm_work = Command::new(setup.vmm);
    vmm_work.args(["--workload", "work 1 R 1 1"]);
    let mut bare_proc = Command::new(setup.me);
    bare_proc.arg("--bare-first-exit");
    let mut bare_irq_proc = Command::new(setup.me);
    bare_irq_proc.args(["--bare-first-exit", "--irqchip"]);
    let mut cmds = [vmm_tiny, bare_proc, bare_irq_proc, vmm_work];
    for cmd in cmds.iter_mut() {
        spawn_timed(cmd)?;
    }
    let mut times: [Vec<f64>; 4] = Default::default();
    for _ in 0..runs {
        for (cmd, t) in cmds.iter_mut().zip(times.iter_mut()) {
            t.push(ms(spawn_timed(cmd)?));
        }
    }
    let [tiny, bare, bare_irq, work] = times;
    let bare_note = format!(
        "bare = this binary with --bare-first-exit (bare setup + one exit + process exit; range \
         {}, min {:.2} ms)",
        spread(&bare, 2),
        min(&bare)
    );
    rows.push(Row::measured(
        1,
        "launch_first_exit_process",
        "launch → first guest exit → process end (spawned)",
        "ms",
        median(&tiny),
        "bare re-exec",
        Some(median(&bare)),
        Target::None,
        format!(
            "median of {runs} wall times, spawn to exit status, interleaved; ours = `vmm {}` \
             (guest resets at its first `out`; range {}, min {:.2} ms); {bare_note}",
            tiny_args.join(" "),
            spread(&tiny, 2),
            min(&tiny)
        ),
    ));
    rows.push(Row::measured(
        1,
        "launch_first_exit_process_vs_irqchip",
        "launch → first guest exit → process end (spawned), vs bare + irqchip",
        "ms",
        median(&tiny),
        "bare re-exec + irqchip",
        Some(median(&bare_irq)),
        Target::None,
        format!(
            "same runs as the row above; baseline = --bare-first-exit --irqchip (adds \
             KVM_CREATE_IRQCHIP + KVM_CREATE_PIT2, whose teardown at process exit also counts; \
             range {}, min {:.2} ms)",
            spread(&bare_irq, 2),
            min(&bare_irq)
        ),
    ));
    rows.push(Row::measured(
        2,
        "launch_workload_process",
        "launch → exit of the OS-less guest `work 1 R 1 1` (spawned)",
        "ms",
        median(&work),
        "bare re-exec",
        Some(median(&bare)),
        Target::None,
        format!(
            "median of {runs} wall times of `vmm --workload \"work 1 R 1 1\"` (no irqchip; \
             one task, 1 random access over 1 MiB, 1 iteration, in user mode; range {}, min \
             {:.2} ms), interleaved with the bare re-exec above",
            spread(&work, 2),
            min(&work)
        ),
    ));
    Ok(rows)
}

fn min(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::INFINITY, f64::min)
}
