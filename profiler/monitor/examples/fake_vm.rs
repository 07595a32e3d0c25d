//! A fake VM for trying the monitors without KVM: publishes a guest and a host region in the run
//! directory and fills them like a guest driver and the VMM's sampler would.
//!
//! ```sh
//! cargo run -p mirrorball-monitor --example fake_vm -- --tasks 3 --vcpus 2 --hz 20 --duration 30
//! vmm top        # in another terminal
//! ```
//!
//! Options: `--run-dir DIR`, `--n N` (VM number), `--name NAME`, `--vcpus N`, `--tasks N`,
//! `--hz HZ` (guest and host sampling rate, 1..=10000), `--duration SECS` (default: until
//! SIGINT/SIGTERM), `--churn SECS` (unregister and re-register a task this often), `--hostile`
//! (scribble over the guest region now and then, as a malicious guest could).
//!
//! Each task `i` faults at its own rate that swings slowly (minor faults, and 1 % major
//! faults), shares the vCPUs round-robin, and every first touch shows up on the host as KVM
//! `pf_taken` and a host fault of the vCPU thread running it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mirrorball_monitor::open::monotonic_ns;
use mirrorball_monitor::publish::{PublishSpec, PublishedVm};
use mirrorball_monitor::resolve_run_dir;
use mirrorball_profiler_abi::{
    comm_from, Attribution, CurrentTask, GuestSample, HostSample, SAMPLE_EXITED,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Options {
    run_dir: Option<PathBuf>,
    n: u32,
    name: String,
    vcpus: u32,
    tasks: u32,
    hz: f64,
    duration: Option<f64>,
    churn: Option<f64>,
    hostile: bool,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        run_dir: None,
        n: 0,
        name: "fake".into(),
        vcpus: 2,
        tasks: 3,
        hz: 20.0,
        duration: None,
        churn: None,
        hostile: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("{v:?} is not a number"))
        };
        match a.as_str() {
            "--run-dir" => o.run_dir = Some(PathBuf::from(val()?)),
            "--n" => o.n = u32::try_from(whole(num(val()?)?)).unwrap_or(u32::MAX),
            "--name" => o.name = val()?,
            "--vcpus" => o.vcpus = u32::try_from(whole(num(val()?)?)).unwrap_or(u32::MAX),
            "--tasks" => o.tasks = u32::try_from(whole(num(val()?)?)).unwrap_or(u32::MAX),
            "--hz" => o.hz = num(val()?)?,
            "--duration" => o.duration = Some(num(val()?)?),
            "--churn" => o.churn = Some(num(val()?)?),
            "--hostile" => o.hostile = true,
            "-h" | "--help" => {
                println!(
                    "fake_vm [--run-dir DIR] [--n N] [--name NAME] [--vcpus N] [--tasks N] \
                     [--hz HZ] [--duration SECS] [--churn SECS] [--hostile]"
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown option {a}")),
        }
    }
    if !(1.0..=10_000.0).contains(&o.hz) {
        return Err("--hz must be 1..=10000".into());
    }
    if o.vcpus == 0 || o.vcpus > 64 || o.tasks == 0 || o.tasks > 1000 {
        return Err("--vcpus must be 1..=64 and --tasks 1..=1000".into());
    }
    Ok(o)
}

/// Counters of one simulated task.
struct Task {
    id: u32,
    pid: u32,
    name: String,
    min: f64,
    maj: f64,
    utime: u64,
    stime: u64,
    cpu: u32,
    /// Base minor-fault rate per second.
    rate: f64,
}

/// `x` as a whole number: float-to-integer `as` truncates toward zero and saturates (NaN is 0),
/// which is what these synthetic counters and options want.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn whole(x: f64) -> u64 {
    x as u64
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fake_vm: {e}");
            std::process::exit(2);
        }
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs an async-signal-safe handler that only stores an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let dir = resolve_run_dir(o.run_dir.as_deref());
    let period_ns = whole(1e9 / o.hz);
    let records_per_tick = o.tasks.max(o.vcpus);
    // Two seconds of history in each ring, at least 1024 records.
    let ring = (u32::try_from(whole(o.hz * 2.0)).unwrap_or(u32::MAX) * records_per_tick)
        .clamp(1024, 1 << 20);
    let spec = PublishSpec {
        n: o.n,
        name: o.name.clone(),
        guest: "workload".into(),
        vcpus: o.vcpus,
        tasks: o.tasks.max(16),
        guest_ring: ring,
        host_ring: ring,
        generation: monotonic_ns() | 1,
        guest_period_ns: period_ns,
        host_period_ns: period_ns,
    };
    let vm = match PublishedVm::create(&dir, &spec) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("fake_vm: cannot publish in {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    eprintln!(
        "fake_vm: VM {} in {} ({} vCPUs, {} tasks, {} Hz)",
        vm.id(),
        dir.display(),
        o.vcpus,
        o.tasks,
        o.hz
    );
    if let Err(e) = run(&vm, &o, period_ns) {
        eprintln!("fake_vm: {e}");
        std::process::exit(1);
    }
}

fn run(vm: &PublishedVm, o: &Options, period_ns: u64) -> std::io::Result<()> {
    let guest = vm.guest()?;
    let host = vm.host()?;
    let view = guest
        .view()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut gring = guest
        .ring_writer()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut hring = host
        .ring_writer()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut table = guest.task_table();
    let mut slots: Vec<_> = (0..o.vcpus)
        .map(|v| guest.vcpu_writer(v).expect("vCPU index in range"))
        .collect();
    guest.set_guest_boot_id(0x600d);
    let start = monotonic_ns();
    let mut tasks: Vec<Task> = (0..o.tasks)
        .map(|i| {
            let name = format!("work-{i}");
            let pid = 100 + i;
            let id = table
                .register(pid, pid, &comm_from(name.as_bytes()), start)
                .expect("task table has room");
            Task {
                id,
                pid,
                name,
                min: 0.0,
                maj: 0.0,
                utime: 0,
                stime: 0,
                cpu: mirrorball_profiler_abi::CPU_NONE,
                rate: 2000.0 * (i as f64 + 1.0),
            }
        })
        .collect();
    let mut prev_switch: Vec<Option<u64>> = vec![None; o.vcpus as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_pid = 100 + o.tasks;
    let began = Instant::now();
    let mut last_churn = Instant::now();
    let mut tick: u64 = 0;
    let hostile_words = AtomicU64::new(0);
    let dt = period_ns as f64 / 1e9;
    while !STOP.load(Ordering::Relaxed) {
        if o.duration
            .is_some_and(|d| began.elapsed().as_secs_f64() >= d)
        {
            break;
        }
        let now = monotonic_ns();
        let t = (now - start) as f64 / 1e9;
        let n = tasks.len();
        // Which task each vCPU runs this tick (round-robin; switches every tick if tasks > vCPUs).
        let running: Vec<Option<usize>> = (0..o.vcpus as usize)
            .map(|v| {
                if n == 0 {
                    None
                } else if n <= o.vcpus as usize {
                    (v < n).then_some(v)
                } else {
                    Some((v + usize::try_from(tick).expect("fits")) % n)
                }
            })
            .collect();
        for (v, r) in running.iter().enumerate() {
            let cur = match r {
                Some(i) => {
                    let task = &tasks[*i];
                    CurrentTask {
                        task_id: task.id,
                        pid: task.pid,
                        tgid: task.pid,
                        flags: 0,
                        comm: comm_from(task.name.as_bytes()),
                    }
                }
                None => CurrentTask {
                    flags: mirrorball_profiler_abi::VCPU_IDLE,
                    comm: comm_from(b"swapper"),
                    ..CurrentTask::default()
                },
            };
            slots[v].switch_to(&cur, now);
        }
        // Guest side: absolute counters of every task.
        let mut faults_on_vcpu = vec![0f64; o.vcpus as usize];
        for (i, task) in tasks.iter_mut().enumerate() {
            let on = running.iter().position(|r| *r == Some(i));
            let share = if on.is_some() { 1.0 } else { 0.0 };
            let swing = 1.0 + 0.8 * (t / (3.0 + i as f64)).sin();
            let faults = task.rate * swing * share * dt;
            task.min += faults;
            task.maj += faults / 100.0;
            if let Some(v) = on {
                task.cpu = u32::try_from(v).expect("fits");
                faults_on_vcpu[v] += faults * 1.01;
                task.utime += whole(period_ns as f64 * 0.7);
                task.stime += whole(period_ns as f64 * 0.25);
            }
            gring.push(&GuestSample {
                timestamp_ns: now,
                task_id: task.id,
                pid: task.pid,
                min_flt: whole(task.min),
                maj_flt: whole(task.maj),
                utime_ns: task.utime,
                stime_ns: task.stime,
                cpu: task.cpu,
                flags: 0,
            });
        }
        // Host side: one record per vCPU, attributed from its slot.
        for v in 0..o.vcpus {
            let a = Attribution::from_slot(view.vcpu(v), prev_switch[v as usize]);
            prev_switch[v as usize] = Some(a.guest_switch_count);
            let busy = running[v as usize].is_some();
            let pf = whole(faults_on_vcpu[v as usize]);
            let mut s = HostSample {
                timestamp_ns: now,
                vcpu: v,
                interval_ns: period_ns,
                pf_taken: pf + 3,
                pf_fixed: pf,
                exits: 10 + pf / 4,
                host_min_flt: pf,
                host_maj_flt: pf / 500,
                vcpu_utime_ns: if busy {
                    period_ns * 6 / 10
                } else {
                    period_ns / 50
                },
                vcpu_stime_ns: if busy {
                    period_ns * 3 / 10
                } else {
                    period_ns / 100
                },
                ..HostSample::default()
            };
            s.set_attribution(&a);
            hring.push(&s);
        }
        // Task churn: the oldest task exits and a new one registers.
        if o.churn
            .is_some_and(|c| last_churn.elapsed().as_secs_f64() >= c)
            && !tasks.is_empty()
        {
            last_churn = Instant::now();
            let old = tasks.remove(0);
            gring.push(&GuestSample {
                timestamp_ns: now,
                task_id: old.id,
                pid: old.pid,
                min_flt: whole(old.min),
                maj_flt: whole(old.maj),
                utime_ns: old.utime,
                stime_ns: old.stime,
                cpu: old.cpu,
                flags: SAMPLE_EXITED,
            });
            let _ = table.unregister(old.id, now);
            let name = format!("work-{next_pid}");
            if let Ok(id) = table.register(next_pid, next_pid, &comm_from(name.as_bytes()), now) {
                tasks.push(Task {
                    id,
                    pid: next_pid,
                    name,
                    min: 0.0,
                    maj: 0.0,
                    utime: 0,
                    stime: 0,
                    cpu: mirrorball_profiler_abi::CPU_NONE,
                    rate: old.rate,
                });
            }
            next_pid += 1;
        }
        if o.hostile && tick % whole(o.hz).max(1) == 0 {
            scribble(vm, &mut rng, &hostile_words)?;
        }
        tick += 1;
        // Sleep until the next period boundary.
        let next = start + tick * period_ns;
        let now = monotonic_ns();
        if next > now {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
    }
    eprintln!(
        "fake_vm: VM {} done after {} ticks{}",
        vm.id(),
        tick,
        if o.hostile {
            format!(
                ", {} guest words scribbled",
                hostile_words.load(Ordering::Relaxed)
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Writes random values into random words of the guest region, as a hostile guest could.
fn scribble(vm: &PublishedVm, rng: &mut u64, count: &AtomicU64) -> std::io::Result<()> {
    let region = vm.guest_raw()?.as_region();
    let words = region.len() / 8;
    let base = region.as_ptr().cast::<AtomicU64>();
    for k in 0..64 {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        // Every 8th word lands in the first 4 KiB: header, vCPU slots, task table.
        let span = if k % 8 == 0 { words.min(512) } else { words };
        let i = usize::try_from(*rng % span as u64).expect("fits");
        // SAFETY: `i < words`, the mapping is live for the borrow of `vm`, 8-aligned, and this
        // process writes it only through atomics.
        let w = unsafe { &*base.add(i) };
        w.store(*rng, Ordering::Relaxed);
        count.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
