//! Profiler end-to-end latency: from a sample's timestamp to the moment a reader on the
//! dashboard's code path has it in hand.
//!
//! One OS-less workload VM runs in this process with the host sampler at 1 kHz; its guest task
//! appends a guest sample after every iteration (about one per millisecond, see the row notes).
//! The reader is `vmm top`'s: a [`Fleet`] that, once per refresh, scans the run directory, polls
//! every VM's rings and closes the model's window ([`Fleet::tick`], with
//! [`Fleet::poll_observe`] in place of `poll` so that each batch can be timed between the poll
//! and the model's ingest). A sample's latency is host `CLOCK_MONOTONIC` right after the poll
//! that returned it minus the sample's timestamp, on the same clock:
//!
//! - host samples: `timestamp_ns` is the sampler's `CLOCK_MONOTONIC` reading at the end of the
//!   interval, taken just before it reads that vCPU's KVM stats and `/proc` counters and pushes
//!   the record — so the latency covers those reads, the ring push, and the wait for the reader;
//! - guest samples: `timestamp_ns` is the guest's clock, the TSC scaled by the TSC frequency KVM
//!   reports (what the OS-less guest writes). It is moved onto the host clock by an offset
//!   measured once before the vCPU starts: `KVM_GET_MSRS(IA32_TSC)` on the vCPU, scaled the same
//!   way, against `CLOCK_MONOTONIC` read around the ioctl (its uncertainty is in the notes).
//!
//! The reader runs at two cadences, one after the other on the same VM: `vmm top`'s default
//! refresh interval (500 ms), where the wait for the next refresh dominates, and every sampling
//! period (1 ms), where what is left is the pipeline itself. The first poll after attaching
//! reads the rings' backlog and is not counted.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_msr_entry, Msrs};
use mirrorball_monitor::fleet::Fleet;
use mirrorball_monitor::open::monotonic_ns;
use mirrorball_monitor::ModelConfig;
use vmm::builder::workload;
use vmm::session::{self, SessionOptions};
use vmm::workload::TaskSpec;

use super::report::{Row, Target};

/// Host (and guest) sampling period.
const PERIOD: Duration = Duration::from_millis(1);
/// `vmm top`'s default refresh interval.
const DASHBOARD_INTERVAL: Duration = Duration::from_millis(500);
/// The task: random accesses over 4 MiB (faulted in by the first iterations, then cache
/// resident, so iterations take a steady time), with enough iterations to outlast both
/// measurements (the VM is interrupted when they are done).
const SPEC: &str = "work 4 R 100000 16000000";
/// `IA32_TSC`.
const MSR_TSC: u32 = 0x10;

/// Guest clock → host `CLOCK_MONOTONIC`.
#[derive(Clone, Copy, Debug)]
struct GuestClock {
    /// Host ns minus guest ns at the same instant.
    offset_ns: i128,
    /// Width of the host-clock window around the TSC read, ns (the offset's uncertainty).
    window_ns: u64,
}

impl GuestClock {
    /// Reads the guest TSC of a vCPU that has not started and maps the guest's clock (TSC
    /// scaled by `tsc_khz`, as the guest computes it) onto host `CLOCK_MONOTONIC`.
    fn measure(vcpu: &kvm_ioctls::VcpuFd) -> Result<Self> {
        let khz = u128::from(vcpu.get_tsc_khz().context("KVM_GET_TSC_KHZ")?);
        if khz == 0 {
            bail!("KVM reports no TSC frequency");
        }
        let mut best: Option<Self> = None;
        // The narrowest of a few windows.
        for _ in 0..5 {
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_TSC,
                ..Default::default()
            }])
            .map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
            let before = monotonic_ns();
            let n = vcpu.get_msrs(&mut msrs).context("KVM_GET_MSRS(IA32_TSC)")?;
            let after = monotonic_ns();
            if n != 1 {
                bail!("KVM_GET_MSRS read {n} of 1 MSRs");
            }
            let tsc = u128::from(msrs.as_slice()[0].data);
            let guest_ns = i128::try_from(tsc * 1_000_000 / khz).expect("fits");
            let mid = i128::from(before / 2 + after / 2);
            let this = Self {
                offset_ns: mid - guest_ns,
                window_ns: after - before,
            };
            if best.is_none_or(|b| this.window_ns < b.window_ns) {
                best = Some(this);
            }
        }
        best.context("no TSC reading")
    }

    fn host_ns(&self, guest_ns: u64) -> i128 {
        i128::from(guest_ns) + self.offset_ns
    }
}

/// Latencies seen by one reader cadence, ns.
#[derive(Default)]
struct Seen {
    host: Vec<f64>,
    guest: Vec<f64>,
    /// Guest timestamps, for the guest's sampling period.
    guest_ts: Vec<u64>,
    polls: u64,
}

/// Runs the dashboard's refresh loop (scan, poll, close the window) every `interval` for
/// `duration`, timing every sample each poll returns.
fn read_for(
    dir: &std::path::Path,
    interval: Duration,
    duration: Duration,
    clock: GuestClock,
) -> Seen {
    let mut fleet = Fleet::new(dir, ModelConfig::default());
    // Attach and drain the backlog (not counted).
    fleet.tick();
    let mut seen = Seen::default();
    let end = Instant::now() + duration;
    let mut next = Instant::now() + interval;
    while Instant::now() < end {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next = (next + interval).max(Instant::now() + interval / 2);
        fleet.refresh();
        fleet.poll_observe(|_, batch| {
            let at = monotonic_ns();
            for r in &batch.host {
                seen.host
                    .push(at.saturating_sub(r.record.timestamp_ns) as f64);
            }
            for r in &batch.guest {
                let ts = r.record.timestamp_ns;
                seen.guest_ts.push(ts);
                seen.guest.push((i128::from(at) - clock.host_ns(ts)) as f64);
            }
        });
        fleet.end_window();
        seen.polls += 1;
    }
    seen
}

/// The `q`-quantile (0..=1) of `samples`, nearest rank.
fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    // `q` is in [0, 1]: the rank is within the sample count.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn ms(ns: f64) -> f64 {
    ns / 1e6
}

/// Median interval between consecutive guest samples, ms.
fn guest_period_ms(ts: &[u64]) -> f64 {
    let gaps: Vec<f64> = ts
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| (w[1] - w[0]) as f64)
        .collect();
    ms(quantile(&gaps, 0.5))
}

/// Benchmark 7: sample → reader latency at the dashboard's interval and at the sampling period.
pub fn run(seconds: f64) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec: TaskSpec = SPEC.parse().context("spec")?;
    let built = workload::build(vec![spec], 1, None, Some(PERIOD), &dir).context("building")?;
    let clock = GuestClock::measure(built.vcpus[0].fd())?;
    let interrupted = AtomicBool::new(false);
    let duration = Duration::from_secs_f64(seconds.max(1.0));
    let (dash, fast, report) = std::thread::scope(|s| -> Result<_> {
        let vm = s.spawn(|| {
            session::run(
                built,
                SessionOptions {
                    timeout: Some(Duration::from_secs(600)),
                    interrupted: &interrupted,
                    console_input: false,
                    keep_regions: None,
                },
            )
        });
        // Let the guest register its task and the sampler start.
        std::thread::sleep(Duration::from_millis(200));
        let dash = read_for(&dir, DASHBOARD_INTERVAL, duration, clock);
        let fast = read_for(&dir, PERIOD, duration, clock);
        interrupted.store(true, Ordering::SeqCst);
        let report = vm
            .join()
            .map_err(|_| anyhow::anyhow!("VM thread panicked"))?;
        Ok((dash, fast, report))
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    let report = report.context("running the VM")?;
    if report.end.kind == "workload_finished" {
        bail!("the workload finished before the measurement did: raise its iterations");
    }
    for (name, s) in [("500 ms", &dash), ("1 ms", &fast)] {
        if s.host.is_empty() || s.guest.is_empty() {
            bail!(
                "the {name} reader saw {} host and {} guest samples in {} polls",
                s.host.len(),
                s.guest.len(),
                s.polls
            );
        }
    }
    let period_ms = ms(PERIOD.as_nanos() as f64);
    let interval_ms = ms(DASHBOARD_INTERVAL.as_nanos() as f64);
    let guest_period = guest_period_ms(&fast.guest_ts);
    let sampler = report.sampler.unwrap_or_default();
    let describe = |s: &Seen, lat: &[f64]| {
        format!(
            "{} samples over {} polls; median {:.3} ms, p99 {:.3} ms, min {:.3} ms, max {:.3} ms",
            lat.len(),
            s.polls,
            ms(quantile(lat, 0.5)),
            ms(quantile(lat, 0.99)),
            ms(quantile(lat, 0.0)),
            ms(quantile(lat, 1.0)),
        )
    };
    let guest_clock_note = format!(
        "guest clock = TSC / KVM's TSC kHz, put on host CLOCK_MONOTONIC by KVM_GET_MSRS(IA32_TSC) \
         before the vCPU started (±{:.1} µs); guest samples every {guest_period:.3} ms (one per \
         iteration of `{SPEC}`)",
        clock.window_ns as f64 / 2e3
    );
    let sampler_note = format!(
        "host sampler at {period_ms} ms: {} ticks, {} late",
        sampler.ticks, sampler.late_ticks
    );
    let mut rows = Vec::new();
    for (id, what, s, lat, baseline_name, baseline, extra) in [
        (
            "latency_host_dashboard",
            "host sample → `vmm top` refresh (500 ms): latency",
            &dash,
            &dash.host,
            "refresh interval",
            interval_ms,
            sampler_note.clone(),
        ),
        (
            "latency_guest_dashboard",
            "guest sample → `vmm top` refresh (500 ms): latency",
            &dash,
            &dash.guest,
            "refresh interval",
            interval_ms,
            guest_clock_note.clone(),
        ),
        (
            "latency_host_period",
            "host sample → reader polling every 1 ms: latency",
            &fast,
            &fast.host,
            "sampling period",
            period_ms,
            sampler_note.clone(),
        ),
        (
            "latency_guest_period",
            "guest sample → reader polling every 1 ms: latency",
            &fast,
            &fast.guest,
            "sampling period",
            period_ms,
            guest_clock_note.clone(),
        ),
    ] {
        let median = ms(quantile(lat, 0.5));
        let p99 = ms(quantile(lat, 0.99));
        rows.push(Row::measured(
            7,
            id,
            what,
            "ms",
            median,
            baseline_name,
            Some(baseline),
            Target::None,
            format!(
                "{}; p99/{baseline_name} = {:.2}×, median/sampling period = {:.1}×; reader = \
                 Fleet refresh + poll + end_window (the `vmm top` path), latency = \
                 CLOCK_MONOTONIC after the poll − sample timestamp; {extra}",
                describe(s, lat),
                p99 / baseline,
                median / period_ms,
            ),
        ));
    }
    Ok(rows)
}
