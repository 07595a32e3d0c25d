//! Dashboard CPU with 10 VMs: what `vmm top` costs while it watches 10 VMs sampled at 1 kHz.
//!
//! The dashboard runs headless on the calling thread ([`top::run_headless`]: the same `App`,
//! `Fleet` refresh — scan, poll every VM, close the model's window — and ratatui drawing through
//! the crossterm backend as `vmm top`, every 500 ms, onto a 160×50 screen whose escape sequences
//! go to a sink; only the key handling is missing). Its cost is the thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`) over the wall time, as a percentage of one core, with:
//!
//! - 10 fake VMs: regions published by this process and filled by one writer thread at 1 kHz
//!   like the `fake_vm` example (2 vCPUs, 3 tasks each: 3 guest and 2 host records per VM and
//!   tick);
//! - 10 real VMs: `vmm --workload … --sample-hz 1000` processes (1 vCPU, 1 task each; the guest
//!   samples once per iteration, the host sampler every millisecond), if KVM is there. On a
//!   2-core machine their 10 spinning vCPUs oversubscribe the CPUs: the dashboard's CPU time is
//!   what counts, not how late its refreshes run.
//!
//! The baseline, measured in the same run, is the same loop on an empty run directory.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirrorball_monitor::open::monotonic_ns;
use mirrorball_monitor::publish::{PublishSpec, PublishedVm};
use mirrorball_monitor::top::{self, TopOptions};
use mirrorball_profiler_abi::{comm_from, Attribution, CurrentTask, GuestSample, HostSample};

use super::report::{Row, Target};

/// VMs watched.
const VMS: u32 = 10;
/// Sampling period of every VM.
const PERIOD_NS: u64 = 1_000_000;
/// `vmm top`'s default refresh interval.
const INTERVAL: Duration = Duration::from_millis(500);
/// Screen size the dashboard draws.
const WIDTH: u16 = 160;
/// Screen height.
const HEIGHT: u16 = 50;
/// The real VMs' task: long enough to outlast the measurement.
const REAL_SPEC: &str = "work 4 R 150000 16000000";
/// Target: at most this % of one core.
const TARGET_PCT: f64 = 2.0;

/// CPU time of the calling thread, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).expect("fits") * 1_000_000_000
        + u64::try_from(ts.tv_nsec).expect("fits")
}

/// One headless dashboard run on `dir`.
struct Measured {
    /// CPU time / wall time, % of one core.
    pct: f64,
    frames: u64,
    cpu_ms_per_frame: f64,
    kib_per_frame: f64,
    /// Guest and host samples ingested per second.
    samples_per_s: f64,
}

fn measure(dir: &Path, duration: Duration, expect_vms: usize) -> Result<Measured> {
    let opts = TopOptions {
        run_dir: dir.to_path_buf(),
        interval: INTERVAL,
    };
    let (cpu0, wall0) = (thread_cpu_ns(), Instant::now());
    let report = top::run_headless(&opts, WIDTH, HEIGHT, duration, std::io::sink())
        .context("headless dashboard")?;
    let (cpu, wall) = (thread_cpu_ns() - cpu0, wall0.elapsed());
    let frames = report.frames.max(1) as f64;
    if report.vms != expect_vms {
        bail!("the dashboard saw {} VMs, not {expect_vms}", report.vms);
    }
    Ok(Measured {
        pct: cpu as f64 / wall.as_nanos() as f64 * 100.0,
        frames: report.frames,
        cpu_ms_per_frame: cpu as f64 / 1e6 / frames,
        kib_per_frame: report.bytes as f64 / 1024.0 / frames,
        samples_per_s: report.samples as f64 / wall.as_secs_f64(),
    })
}

/// One fake VM's writer state: task counters, as `fake_vm` keeps them.
struct Fake {
    vm: PublishedVm,
    /// (task id, pid, command name).
    tasks: Vec<(u32, u32, mirrorball_profiler_abi::Comm)>,
    min_flt: u64,
    prev_switch: [Option<u64>; 2],
}

const FAKE_VCPUS: u32 = 2;
const FAKE_TASKS: u32 = 3;

impl Fake {
    fn publish(dir: &Path, n: u32) -> Result<Self> {
        let vm = PublishedVm::create(
            dir,
            &PublishSpec {
                n,
                name: format!("fake-{n}"),
                vcpus: FAKE_VCPUS,
                tasks: 16,
                guest_ring: 8192,
                host_ring: 8192,
                generation: monotonic_ns() | 1,
                guest_period_ns: PERIOD_NS,
                host_period_ns: PERIOD_NS,
                ..PublishSpec::default()
            },
        )
        .with_context(|| format!("publishing fake VM {n} in {}", dir.display()))?;
        let now = monotonic_ns();
        let mut tasks = Vec::new();
        {
            let guest = vm.guest()?;
            let mut table = guest.task_table();
            for i in 0..FAKE_TASKS {
                let pid = 100 + i;
                let comm = comm_from(format!("work-{i}").as_bytes());
                let id = table
                    .register(pid, pid, &comm, now)
                    .map_err(|e| anyhow::anyhow!("register: {e:?}"))?;
                tasks.push((id, pid, comm));
            }
        }
        Ok(Self {
            vm,
            tasks,
            min_flt: 0,
            prev_switch: [None; 2],
        })
    }

    /// One sampling tick: vCPU slots, a guest sample per task, a host sample per vCPU.
    fn tick(&mut self, tick: u64) -> Result<()> {
        let now = monotonic_ns();
        let guest = self.vm.guest()?;
        let host = self.vm.host()?;
        let view = guest
            .view()
            .map_err(|e| anyhow::anyhow!("guest view: {e:?}"))?;
        let mut gring = guest
            .ring_writer()
            .map_err(|e| anyhow::anyhow!("guest ring: {e:?}"))?;
        let mut hring = host
            .ring_writer()
            .map_err(|e| anyhow::anyhow!("host ring: {e:?}"))?;
        self.min_flt += 50;
        let n = self.tasks.len();
        for v in 0..FAKE_VCPUS {
            let (id, pid, comm) =
                self.tasks[(v as usize + usize::try_from(tick).expect("fits")) % n];
            if let Ok(mut slot) = guest.vcpu_writer(v) {
                slot.switch_to(
                    &CurrentTask {
                        task_id: id,
                        pid,
                        tgid: pid,
                        flags: 0,
                        comm,
                    },
                    now,
                );
            }
        }
        for (i, &(id, pid, _)) in self.tasks.iter().enumerate() {
            gring.push(&GuestSample {
                timestamp_ns: now,
                task_id: id,
                pid,
                min_flt: self.min_flt * (i as u64 + 1),
                maj_flt: self.min_flt / 100,
                utime_ns: tick * PERIOD_NS / 2,
                stime_ns: tick * PERIOD_NS / 4,
                cpu: u32::try_from(i).expect("fits") % FAKE_VCPUS,
                flags: 0,
            });
        }
        for v in 0..FAKE_VCPUS {
            let a = Attribution::from_slot(view.vcpu(v), self.prev_switch[v as usize]);
            self.prev_switch[v as usize] = Some(a.guest_switch_count);
            let mut s = HostSample {
                timestamp_ns: now,
                vcpu: v,
                interval_ns: PERIOD_NS,
                pf_taken: 60,
                pf_fixed: 50,
                exits: 20,
                host_min_flt: 50,
                vcpu_utime_ns: PERIOD_NS * 6 / 10,
                vcpu_stime_ns: PERIOD_NS * 3 / 10,
                ..HostSample::default()
            };
            s.set_attribution(&a);
            hring.push(&s);
        }
        Ok(())
    }
}

/// Publishes the fake VMs and fills them every period until `stop`.
fn fake_writer(dir: &Path, stop: &AtomicBool, ready: &AtomicBool) -> Result<u64> {
    let mut vms = (0..VMS)
        .map(|n| Fake::publish(dir, n))
        .collect::<Result<Vec<_>>>()?;
    ready.store(true, Ordering::SeqCst);
    let start = monotonic_ns();
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for vm in &mut vms {
            vm.tick(tick)?;
        }
        tick += 1;
        let next = start + tick * PERIOD_NS;
        let now = monotonic_ns();
        if next > now {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
    }
    Ok(tick)
}

/// Real VMs: `vmm` processes, killed on drop.
struct RealVms(Vec<Child>);

impl Drop for RealVms {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: signals a child this process started and has not reaped yet.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

fn start_real(vmm: &Path, dir: &Path, seconds: f64) -> Result<RealVms> {
    let mut vms = RealVms(Vec::new());
    // A positive number of seconds; float-to-integer `as` saturates.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let timeout = format!("{}", (seconds * 3.0).ceil() as u64 + 30);
    for _ in 0..VMS {
        let child = Command::new(vmm)
            .args(["--workload", REAL_SPEC, "--sample-hz", "1000", "--timeout"])
            .arg(&timeout)
            .arg("--run-dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", vmm.display()))?;
        vms.0.push(child);
    }
    // Wait until every VM has published its regions.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let scan = mirrorball_monitor::scan(dir).context("scanning the run directory")?;
        if u32::try_from(scan.live.len()).expect("fits") >= VMS {
            return Ok(vms);
        }
        if let Some(exited) = vms.0.iter_mut().find_map(|c| c.try_wait().ok().flatten()) {
            bail!("a vmm process ended early ({exited})");
        }
        if Instant::now() > deadline {
            bail!("only {} of {VMS} VMs published in 20 s", scan.live.len());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("vmm-bench-dashboard-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn row(id: &str, what: &str, ours: &Measured, idle: &Measured, note: String) -> Row {
    Row::measured(
        8,
        id,
        what,
        "%",
        ours.pct,
        "same loop, no VM",
        Some(idle.pct),
        Target::OursAtMost { value: TARGET_PCT },
        format!(
            "CPU time of the dashboard thread / wall time over {} refreshes every {} ms, \
             {:.0} samples/s ingested ({:.2} ms CPU and {:.1} KiB of terminal output per \
             refresh; no VM: {:.3} ms, {} refreshes); {note}",
            ours.frames,
            INTERVAL.as_millis(),
            ours.samples_per_s,
            ours.cpu_ms_per_frame,
            ours.kib_per_frame,
            idle.cpu_ms_per_frame,
            idle.frames
        ),
    )
}

/// Benchmark 8: the dashboard's CPU with 10 fake VMs and, with `vmm`, 10 real ones.
pub fn run(vmm: Option<&Path>, seconds: f64) -> Result<Vec<Row>> {
    let duration = Duration::from_secs_f64(seconds.max(1.0));
    let empty = scratch_dir("empty");
    std::fs::create_dir_all(&empty)?;
    let idle = measure(&empty, duration, 0)?;
    let _ = std::fs::remove_dir_all(&empty);

    let fake_dir = scratch_dir("fake");
    let stop = AtomicBool::new(false);
    let ready = AtomicBool::new(false);
    let (fake, ticks) = std::thread::scope(|s| -> Result<_> {
        let writer = s.spawn(|| fake_writer(&fake_dir, &stop, &ready));
        while !ready.load(Ordering::SeqCst) && !writer.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let measured = if ready.load(Ordering::SeqCst) {
            measure(&fake_dir, duration, VMS as usize)
        } else {
            Err(anyhow::anyhow!("the fake VMs were not published"))
        };
        stop.store(true, Ordering::SeqCst);
        let ticks = writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        Ok((measured?, ticks))
    })?;
    let _ = std::fs::remove_dir_all(&fake_dir);
    let mut rows = vec![row(
        "dashboard_cpu_fake_vms",
        "`vmm top` CPU, 10 fake VMs sampled at 1 kHz (2 vCPUs, 3 tasks each)",
        &fake,
        &idle,
        format!(
            "fake regions filled by one writer thread in this process ({ticks} ticks of 10 VMs \
             × 3 guest + 2 host records)"
        ),
    )];
    match vmm {
        Some(vmm) => {
            let real_dir = scratch_dir("real");
            let vms = start_real(vmm, &real_dir, seconds)?;
            let real = measure(&real_dir, duration, VMS as usize);
            drop(vms);
            let _ = std::fs::remove_dir_all(&real_dir);
            rows.push(row(
                "dashboard_cpu_real_vms",
                "`vmm top` CPU, 10 OS-less workload VMs sampled at 1 kHz (1 vCPU, 1 task each)",
                &real?,
                &idle,
                format!(
                    "10 `vmm --workload \"{REAL_SPEC}\" --sample-hz 1000` processes (10 spinning \
                     vCPUs on this machine's CPUs)"
                ),
            ));
        }
        None => rows.push(Row::skipped(
            8,
            "dashboard_cpu_real_vms",
            "`vmm top` CPU, 10 OS-less workload VMs",
            Target::OursAtMost { value: TARGET_PCT },
            "no KVM".into(),
        )),
    }
    Ok(rows)
}
