//! What each read of a running thread's counters costs here: the floor under the host
//! sampler's time per tick and vCPU (rows `sampler_tick_cost_*`). A thread spins on the other
//! CPU; this thread reads its counters in a loop, each way the sampler could:
//!
//! - its `/proc/self/task/TID/stat` line (the sampler's source of the thread's host faults);
//! - its `schedstat` (run-queue wait);
//! - its CPU clock (`clock_gettime` on the thread's CPU-time clock);
//! - a perf software counter of its minor faults (`read`: the kernel interrupts the CPU the
//!   thread runs on to bring the count up to date — and such counters miss the faults KVM
//!   takes for a guest through `get_user_pages`, which are most of a vCPU thread's);
//!
//! each against a `getppid` system call, the cheapest round trip into the kernel. And what a
//! thread that only sleeps and wakes every millisecond (as the sampler does at 1 kHz) costs in
//! CPU time per wake-up: the floor under the sampler's whole cost per tick (group 9's rows
//! count it; the tick-cost rows do not).
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use super::report::{Row, Target};

const READS: u32 = 20_000;

/// `struct perf_event_attr` up to `config1` (`PERF_ATTR_SIZE_VER0`: 64 bytes, its `size`).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_PAGE_FAULTS_MIN: u64 = 5;

/// Mean µs of `read` over [`READS`] calls.
fn per_call_us(mut read: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..READS {
        read();
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(READS)
}

/// A perf software counter of `tid`'s minor faults, if the host allows one.
fn fault_counter(tid: i32) -> Option<std::fs::File> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_SOFTWARE,
        size: 64,
        config: PERF_COUNT_SW_PAGE_FAULTS_MIN,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it states, alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr, tid, -1, -1, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Some(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// CPU µs per wake-up of this thread sleeping to each next absolute millisecond, and how many.
fn sleep_wake_cost_us() -> (f64, u32) {
    const WAKES: u32 = 500;
    let cpu = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
    };
    let mut next = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `next` is a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut next) };
    let start = cpu();
    for _ in 0..WAKES {
        next.tv_nsec += 1_000_000;
        if next.tv_nsec >= 1_000_000_000 {
            next.tv_nsec -= 1_000_000_000;
            next.tv_sec += 1;
        }
        // SAFETY: `next` is a valid absolute time; no remainder is asked for.
        unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &next,
                std::ptr::null_mut(),
            )
        };
    }
    ((cpu() - start) / f64::from(WAKES), WAKES)
}

pub fn rows() -> Result<Vec<Row>> {
    let stop = Arc::new(AtomicBool::new(false));
    let tid = Arc::new(AtomicI32::new(0));
    let spinner = {
        let (stop, tid) = (stop.clone(), tid.clone());
        std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid.store(unsafe { libc::gettid() }, Ordering::Release);
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    while tid.load(Ordering::Acquire) == 0 {
        std::thread::yield_now();
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let tid = tid.load(Ordering::Acquire);
    let proc_file = |name: &str| {
        std::fs::File::open(format!("/proc/self/task/{tid}/{name}")).context(name.to_string())
    };
    let (stat, schedstat) = (proc_file("stat")?, proc_file("schedstat")?);
    let mut buf = [0u8; 1024];
    let syscall = per_call_us(|| {
        // SAFETY: getppid has no preconditions.
        std::hint::black_box(unsafe { libc::getppid() });
    });
    let stat_us = per_call_us(|| drop(stat.read_at(&mut buf, 0)));
    let schedstat_us = per_call_us(|| drop(schedstat.read_at(&mut buf, 0)));
    let clock = ((!tid) << 3) | 0b110;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let clock_us = per_call_us(|| {
        // SAFETY: `ts` is a timespec we own; a bad clock id only makes the call fail.
        std::hint::black_box(unsafe { libc::clock_gettime(clock, &mut ts) });
    });
    let perf_us = fault_counter(tid).map(|counter| {
        let mut count = [0u8; 8];
        per_call_us(|| drop(counter.read_at(&mut count, 0)))
    });
    stop.store(true, Ordering::Relaxed);
    let _ = spinner.join();
    let row = |id: &str, what: &str, us: f64, note: &str| {
        Row::measured(
            6,
            id,
            what,
            "µs",
            us,
            "a getppid syscall",
            Some(syscall),
            Target::None,
            format!("mean of {READS} reads of a thread spinning on another CPU; {note}"),
        )
    };
    let mut rows = vec![
        row(
            "probe_stat",
            "reading a running thread's /proc stat line (its host faults)",
            stat_us,
            "the sampler's only source of a vCPU thread's host faults",
        ),
        row(
            "probe_schedstat",
            "reading a running thread's schedstat (its run-queue wait)",
            schedstat_us,
            "",
        ),
        row(
            "probe_cpu_clock",
            "reading a running thread's CPU clock",
            clock_us,
            "clock_gettime on its CPU-time clock",
        ),
    ];
    let (wake_us, wakes) = sleep_wake_cost_us();
    rows.push(Row::measured(
        6,
        "probe_sleep_wake_1khz",
        "a thread that only sleeps and wakes every 1 ms: CPU time per wake-up",
        "µs",
        wake_us,
        "a getppid syscall",
        Some(syscall),
        Target::None,
        format!(
            "{wakes} wake-ups (clock_nanosleep to the next absolute ms); the thread's own CPU \
             time, which on a host that is itself a VM carries the cost of idling and being \
             woken. What any sampler thread at 1 kHz pays before it reads anything"
        ),
    ));
    if let Some(us) = perf_us {
        rows.push(row(
            "probe_perf_faults",
            "reading a perf software counter of a running thread's minor faults",
            us,
            "the kernel interrupts the thread's CPU for each read, and the counter misses the \
             faults KVM takes through get_user_pages (most of a vCPU thread's), so the sampler \
             does not use it",
        ));
    }
    Ok(rows)
}
