//! Benchmark 4: resident memory the VMM costs per VM, beyond the guest's own memory.
//!
//! In process: RSS before and after building K VMs (then after starting them), against K bare
//! kvm-ioctls VMs. Guest RAM is populated lazily on both sides, so it counts only for the pages
//! the builders write (page tables, GDT, boot data, the guest code).
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mirrorball_profiler::thread_usage::ProcessMemory;
use vmm::builder::linux;
use vmm::builder::{BuiltVm, Guest};
use vmm::exit::VmEnd;
use vmm::runner::{self, RunningVcpus};

use super::bare::BareVm;
use super::guest::{self, Scratch};
use super::launch::TINY_MEM_BYTES;
use super::report::{Row, Target};

const MIB: f64 = (1u64 << 20) as f64;

fn rss() -> Result<ProcessMemory> {
    ProcessMemory::current().map_err(|e| anyhow::anyhow!("reading /proc/self/status: {e}"))
}

/// The profiler's default rate: its regions (shared memory the VMM maps) count per VM.
const DEFAULT_PROFILE_PERIOD: Duration = Duration::from_millis(50);

fn build(elf: &Path) -> Result<BuiltVm> {
    let mut config = guest::tiny_linux_config(elf);
    config.profile_period = Some(DEFAULT_PROFILE_PERIOD);
    linux::build(
        &config,
        vmm::builder::ConsoleSink::Null,
        &vmm::profiling::regions::run_dir(),
    )
    .context("building a VM")
}

/// A VM whose vCPU has run to the guest's reset and now sits in `hlt`, with what must outlive
/// the vCPU thread.
struct Started {
    running: RunningVcpus,
    _guest: Guest,
    _vm: vmm::vstate::vm::Vm,
    _profiling: Option<vmm::builder::Profiling>,
}

fn start(built: BuiltVm) -> Result<Started> {
    let BuiltVm {
        vm,
        vcpus,
        control,
        guest,
        profiling,
        ..
    } = built;
    let Guest::Linux { .. } = &guest else {
        bail!("the Linux builder returned another kind of guest");
    };
    let Some(thread) = vcpus.first().map(|v| v.thread_handle()) else {
        bail!("the VM has no vCPU");
    };
    let running = runner::start(vcpus, control)?;
    wait_halted(&thread, Duration::from_secs(10))?;
    Ok(Started {
        running,
        _guest: guest,
        _vm: vm,
        _profiling: profiling,
    })
}

/// Waits until the vCPU `thread` has started and sleeps in the guest's
/// `hlt` (the in-kernel irqchip keeps a halted vCPU inside KVM_RUN, state `S`).
fn wait_halted(thread: &vmm::vstate::vcpu_thread::VcpuThread, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let mut sleeping_seen = 0;
    while std::time::Instant::now() < deadline {
        let id = thread.tid();
        if id > 0 {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{id}/stat"))
                .context("reading the vCPU thread's stat")?;
            // The state follows the command name's closing parenthesis.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next());
            // Seen sleeping twice, 1 ms apart: not a passing wait on its way into the guest.
            sleeping_seen = if state == Some('S') {
                sleeping_seen + 1
            } else {
                0
            };
            if sleeping_seen == 2 {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("timed out after {timeout:?} waiting for the guest's hlt")
}

/// A bare VM on its own thread, run to the guest's `hlt`, kept until `release` is dropped.
struct BareThread {
    release: mpsc::Sender<()>,
    handle: std::thread::JoinHandle<Result<()>>,
}

fn bare_thread(code: Vec<u8>) -> Result<BareThread> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let (release, release_rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || -> Result<()> {
        let setup = BareVm::new(usize::try_from(TINY_MEM_BYTES).expect("fits"), &code).and_then(
            |mut vm| {
                vm.run_to_halt()?;
                Ok(vm)
            },
        );
        match setup {
            Ok(vm) => {
                let _ = ready_tx.send(Ok(()));
                let _ = release_rx.recv();
                drop(vm);
                Ok(())
            }
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                Err(e)
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("bare VM thread did not report")??;
    Ok(BareThread { release, handle })
}

fn per_vm_mib(before: &ProcessMemory, after: &ProcessMemory, k: usize) -> f64 {
    (after.rss_bytes as f64 - before.rss_bytes as f64) / MIB / k as f64
}

fn breakdown(before: &ProcessMemory, after: &ProcessMemory, k: usize) -> String {
    let d = |a: Option<u64>, b: Option<u64>| {
        (a.unwrap_or(0) as f64 - b.unwrap_or(0) as f64) / 1024.0 / k as f64
    };
    format!(
        "anon {:.0} KiB, file {:.0} KiB, shmem {:.0} KiB per VM",
        d(after.anon_bytes, before.anon_bytes),
        d(after.file_bytes, before.file_bytes),
        d(after.shmem_bytes, before.shmem_bytes)
    )
}

/// In-process rows: per-VM RSS of K built VMs and of K started ones, ours against bare.
fn in_process(scratch: &Scratch, k: usize) -> Result<Vec<Row>> {
    let code = guest::reset_then_halt();
    // Ours: an exit to an unclaimed port, then `hlt` (a reset would end the vCPU thread).
    let elf = scratch.file("rss.elf", &guest::elf(&guest::out_then_halt()))?;
    // Warm up both paths once (lazy statics, the kick signal handler, allocator arenas); the
    // warm-up VMs stay alive so the measured ones cannot reuse their freed heap.
    let warm = start(build(&elf)?)?;
    let warm_bare = bare_thread(code.clone())?;

    let before = rss()?;
    let mut built = (0..k).map(|_| build(&elf)).collect::<Result<Vec<_>>>()?;
    let ours_built = rss()?;
    let mut started = Vec::with_capacity(k);
    for vm in built.drain(..) {
        started.push(start(vm)?);
    }
    std::thread::sleep(Duration::from_millis(20));
    let ours_started = rss()?;
    for s in started {
        s.running.stop(VmEnd::Interrupted);
    }

    let bare_before = rss()?;
    let bare_vms = (0..k)
        .map(|_| BareVm::new(usize::try_from(TINY_MEM_BYTES).expect("fits"), &code))
        .collect::<Result<Vec<_>>>()?;
    let bare_built = rss()?;
    drop(bare_vms);
    let bare_before_threads = rss()?;
    let threads = (0..k)
        .map(|_| bare_thread(code.clone()))
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(20));
    let bare_started = rss()?;
    for t in threads {
        drop(t.release);
        t.handle
            .join()
            .map_err(|_| anyhow::anyhow!("bare thread panicked"))??;
    }
    warm.running.stop(VmEnd::Interrupted);
    drop(warm_bare);

    let built_note = format!(
        "RSS delta / {k} VMs kept alive (tiny ELF, 128 MiB each, not run, profiler regions at \
         20 Hz mapped: shmem); ours: {}; bare: {}",
        breakdown(&before, &ours_built, k),
        breakdown(&bare_before, &bare_built, k)
    );
    let started_note = format!(
        "RSS delta / {k} VMs whose vCPU thread ran the guest (one port exit) into `hlt`, sleeping there \
         in KVM_RUN; ours: {}; bare (own thread, KVM_RUN to the hlt exit): {}",
        breakdown(&before, &ours_started, k),
        breakdown(&bare_before_threads, &bare_started, k)
    );
    Ok(vec![
        Row::measured(
            4,
            "rss_per_vm_built",
            "VMM RSS per VM, built",
            "MiB",
            per_vm_mib(&before, &ours_built, k),
            "bare VM",
            Some(per_vm_mib(&bare_before, &bare_built, k)),
            Target::OursAtMost { value: 2.0 },
            built_note,
        ),
        Row::measured(
            4,
            "rss_per_vm_running",
            "VMM RSS per VM, vCPU thread running",
            "MiB",
            per_vm_mib(&before, &ours_started, k),
            "bare VM + thread",
            Some(per_vm_mib(&bare_before_threads, &bare_started, k)),
            Target::OursAtMost { value: 2.0 },
            started_note,
        ),
    ])
}

/// Peaks seen while sampling a process's /proc status.
#[derive(Default)]
struct Peaks {
    non_guest: u64,
    guest: u64,
    samples: usize,
}

fn sample(pid: u32, peaks: &mut Peaks) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return;
    };
    let Ok(m) = ProcessMemory::parse_status(&text) else {
        return;
    };
    let non_guest = m.anon_bytes.unwrap_or(0) + m.file_bytes.unwrap_or(0);
    peaks.non_guest = peaks.non_guest.max(non_guest);
    peaks.guest = peaks.guest.max(m.shmem_bytes.unwrap_or(0));
    peaks.samples += 1;
}

/// Whole-process row: the `vmm` binary running its default workload, sampled every 2 ms.
fn whole_process(vmm: &Path, me: &Path) -> Result<Row> {
    let mut child = Command::new(vmm)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning vmm (default workload)")?;
    let mut peaks = Peaks::default();
    let status = loop {
        sample(child.id(), &mut peaks);
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if !status.success() {
        bail!("vmm (default workload) failed: {status}");
    }
    let out = Command::new(me)
        .args(["--bare-first-exit", "--print-rss"])
        .stdin(Stdio::null())
        .output()
        .context("spawning the bare re-exec")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let bare: Option<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("non_guest_rss_bytes="))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|b| b / MIB);
    Ok(Row::measured(
        4,
        "rss_process_default_workload",
        "`vmm` process RSS excluding guest RAM, default workload",
        "MiB",
        peaks.non_guest as f64 / MIB,
        "bare process",
        bare,
        Target::None,
        format!(
            "peak RssAnon+RssFile over {} samples of /proc/PID/status while `vmm` (no arguments: \
             2 tasks of 64 MiB) ran; its guest RAM touched (RssShmem, memfd) peaked at {:.1} MiB; \
             bare = RssAnon+RssFile of the --bare-first-exit process after its exit (its guest memory is \
             anonymous, so its ~7 written guest pages count here)",
            peaks.samples,
            peaks.guest as f64 / MIB
        ),
    ))
}

/// Prints this process's non-guest RSS for [`whole_process`] (used by `--bare-first-exit`).
pub fn print_own_rss() {
    if let Ok(m) = ProcessMemory::current() {
        println!(
            "non_guest_rss_bytes={}",
            m.anon_bytes.unwrap_or(0) + m.file_bytes.unwrap_or(0)
        );
    }
}

/// Benchmark 4.
pub fn run(scratch: &Scratch, vmm: &Path, me: &Path, k: usize) -> Result<Vec<Row>> {
    let mut rows = in_process(scratch, k.max(1))?;
    match whole_process(vmm, me) {
        Ok(row) => rows.push(row),
        Err(e) => rows.push(Row::skipped(
            4,
            "rss_process_default_workload",
            "`vmm` process RSS excluding guest RAM, default workload",
            Target::None,
            format!("{e:#}"),
        )),
    }
    Ok(rows)
}
