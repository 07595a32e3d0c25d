//! KVM tests of the profiler with the OS-less workload guest: the guest registers its tasks and
//! writes samples into the shared guest region; the host sampler attributes each vCPU's host
//! faults and KVM page faults to the task the vCPU's slot names, at 1 kHz, losing no record; the
//! guest's own minor faults (first touches of its pages) agree with the host's.
mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{distinct_pages, kvm_available};
use mirrorball_profiler_abi::{
    comm_bytes, validate_guest_region, validate_host_region, GuestSample, HostSample, Poll,
    RingView, SAMPLE_EXITED, TASK_UNREGISTERED,
};
use vmm::builder::workload;
use vmm::profiling::regions::ProfilerRegions;
use vmm::report::RunReport;
use vmm::workload::TaskSpec;

/// A workload guest that ran to its end.
struct Run {
    report: RunReport,
    /// Its profiler regions, kept past the end of the session.
    regions: Arc<ProfilerRegions>,
    /// Where the regions' files were.
    dir: PathBuf,
}

/// Builds the workload guest running `specs` on `vcpus` vCPUs, profiled every `period`, and runs
/// it until the workload finishes (at most 60 s), keeping its profiler regions.
fn run_workload(specs: &[&str], vcpus: usize, period: Duration) -> Run {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mb-profiler-test-{}-{run}", std::process::id()));
    let specs: Vec<TaskSpec> = specs.iter().map(|s| s.parse().expect("spec")).collect();
    let built = workload::build(specs, vcpus, None, Some(period), &dir).expect("build");
    let kept: Mutex<Option<Arc<ProfilerRegions>>> = Mutex::new(None);
    let keep = |r: Arc<ProfilerRegions>| *kept.lock().expect("lock") = Some(r);
    let report = common::run_in_process(built, Duration::from_secs(60), Some(&keep));
    assert_eq!(report.end.kind, "workload_finished");
    let regions = kept.lock().expect("lock").take().expect("regions kept");
    Run {
        report,
        regions,
        dir,
    }
}

fn drain<R: mirrorball_profiler_abi::SampleRecord + Copy>(
    ring: RingView<'_, R>,
) -> (Vec<(u64, R)>, u64) {
    let mut reader = ring.reader();
    let mut out = Vec::new();
    let mut lost = 0;
    for _ in 0..1_000_000 {
        match reader.poll() {
            Poll::Record(r) => out.push((r.seq, r.record)),
            Poll::Lost { count, .. } => lost += count,
            _ => break,
        }
    }
    (out, lost)
}

#[test]
fn host_faults_are_attributed_to_the_guest_task_at_1khz_without_loss() {
    if !kvm_available("host_faults_are_attributed_to_the_guest_task_at_1khz_without_loss") {
        return;
    }
    let Run {
        report,
        regions,
        dir,
    } = run_workload(
        &["work 16 R 200000 4", "work 1 L 100 4"],
        2,
        Duration::from_millis(1),
    );

    // Guest side: both tasks registered, sampled every iteration, then unregistered.
    let guest =
        validate_guest_region(regions.guest.region().expect("region")).expect("guest region");
    let tasks: Vec<_> = guest
        .tasks()
        .filter_map(|(id, t)| t.ok().map(|t| (id, t)))
        .filter(|(_, t)| t.pid != 0)
        .collect();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert!(tasks.iter().all(|(_, t)| t.state == TASK_UNREGISTERED));
    let task_r = tasks
        .iter()
        .find(|(_, t)| comm_bytes(&t.comm) == b"work-R")
        .expect("work-R")
        .0;
    let (guest_samples, guest_lost): (Vec<(u64, GuestSample)>, u64) = drain(guest.ring());
    assert_eq!(guest_lost, 0);
    assert_eq!(
        guest_samples.len(),
        2 * (1 + 4 + 1),
        "the start sample, 4 iterations and the exit sample per task"
    );
    let last_r = guest_samples
        .iter()
        .rev()
        .find(|(_, s)| s.task_id == task_r)
        .expect("a work-R sample")
        .1;
    assert_eq!(
        (last_r.min_flt, last_r.maj_flt),
        (4096, 0),
        "work-R first-touched all 4,096 pages: {last_r:?}"
    );

    // Host side: contiguous sequence numbers (no loss at 1 kHz), and vCPU 0's faults land on
    // work-R: its 16 MiB are 4,096 pages, all touched by 800k random accesses.
    let host = validate_host_region(regions.host.region().expect("region")).expect("host region");
    let (host_samples, host_lost): (Vec<(u64, HostSample)>, u64) = drain(host.ring());
    assert_eq!(host_lost, 0);
    assert!(
        host_samples.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "sequence gap"
    );
    let sampler = report.sampler.expect("sampler report");
    assert_eq!(sampler.records, host_samples.len() as u64);
    assert!(sampler.ticks >= 10, "{sampler:?}");
    let charged: u64 = host_samples
        .iter()
        .filter(|(_, s)| s.vcpu == 0 && s.task_id == task_r)
        .map(|(_, s)| s.host_min_flt)
        .sum();
    let total_vcpu0: u64 = host_samples
        .iter()
        .filter(|(_, s)| s.vcpu == 0)
        .map(|(_, s)| s.host_min_flt)
        .sum();
    assert!(
        charged >= 4096,
        "work-R was charged {charged} host faults (vCPU 0 total {total_vcpu0})"
    );
    let pf_taken: u64 = host_samples
        .iter()
        .filter(|(_, s)| s.task_id == task_r)
        .map(|(_, s)| s.pf_taken)
        .sum();
    let on_vcpu1: u64 = host_samples
        .iter()
        .filter(|(_, s)| s.vcpu == 1 && s.task_id == task_r)
        .count() as u64;
    assert_eq!(on_vcpu1, 0, "work-R never ran on vCPU 1");
    eprintln!(
        "work-R: {charged} host faults, {pf_taken} KVM pf_taken; {} host records",
        host_samples.len()
    );
    drop(regions);
    assert!(
        std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) == 0,
        "region files removed"
    );
}

#[test]
fn counts_split_between_tasks_that_share_a_vcpu() {
    if !kvm_available("counts_split_between_tasks_that_share_a_vcpu") {
        return;
    }
    // One vCPU, two tasks taking turns by iteration: the heavy one touches all 2,048 pages of
    // its 8 MiB in its first iteration; the light one a handful of pages of its own.
    let report = run_workload(
        &["work 8 R 200000 6", "work 2 L 200 6"],
        1,
        Duration::from_micros(500),
    )
    .report;
    let heavy = report.tasks[0].host.expect("heavy task attributed");
    let light = report.tasks[1].host.expect("light task attributed");
    let vcpu_total = report.vcpus[0].host_minor_faults;
    assert!(
        heavy.host_min_flt >= 2048 * 9 / 10,
        "heavy {heavy:?}, light {light:?}, vCPU {vcpu_total}"
    );
    assert!(
        light.host_min_flt < 2048 / 10,
        "heavy {heavy:?}, light {light:?}, vCPU {vcpu_total}"
    );
    assert!(light.samples > 0 && heavy.samples > 0);
    // The sampler may also see the few faults the vCPU thread takes after its own final
    // accounting (building its report), never the guest's faults twice.
    let attributed = heavy.host_min_flt + light.host_min_flt;
    assert!(
        attributed <= vcpu_total + 64,
        "attributed {attributed} > vCPU total {vcpu_total}"
    );
}

#[test]
fn guest_minor_faults_are_first_touches_and_host_faults_cover_them() {
    if !kvm_available("guest_minor_faults_are_first_touches_and_host_faults_cover_them") {
        return;
    }
    // Neither task touches its whole region: 3,000 uniform draws over 2,048 pages, and 10,000
    // small steps (about 75 bytes on average) through 4 MiB.
    let specs = ["work 8 R 1000 3", "work 4 L 5000 2"];
    let parsed: Vec<TaskSpec> = specs.iter().map(|s| s.parse().expect("spec")).collect();
    let plan = vmm::workload::layout(&parsed, 2).expect("layout");
    let expected: Vec<u64> = plan.tasks.iter().map(distinct_pages).collect();
    assert!(
        expected[0] > 1000 && expected[0] < 2048 && expected[1] > 50 && expected[1] < 1024,
        "{expected:?}"
    );
    let Run {
        report, regions, ..
    } = run_workload(&specs, 2, Duration::from_millis(1));
    let guest =
        validate_guest_region(regions.guest.region().expect("region")).expect("guest region");
    let (samples, lost): (Vec<(u64, GuestSample)>, u64) = drain(guest.ring());
    assert_eq!(lost, 0);
    for (task, &pages) in expected.iter().enumerate() {
        // The guest names task `i` pid `i + 1`.
        let mine: Vec<GuestSample> = samples
            .iter()
            .map(|(_, s)| *s)
            .filter(|s| s.pid == u32::try_from(task).expect("fits") + 1)
            .collect();
        assert_eq!(
            u32::try_from(mine.len()).expect("fits"),
            1 + plan.tasks[task].iterations + 1,
            "start, iterations, exit: {mine:?}"
        );
        assert_eq!(
            (mine[0].min_flt, mine[0].flags),
            (0, 0),
            "the start sample is the zero baseline: {mine:?}"
        );
        assert!(
            mine.windows(2).all(|w| w[0].min_flt <= w[1].min_flt),
            "absolute counters never decrease: {mine:?}"
        );
        let last = mine.last().expect("samples");
        assert_ne!(last.flags & SAMPLE_EXITED, 0, "{last:?}");
        assert_eq!(
            (last.min_flt, last.maj_flt),
            (pages, 0),
            "task {task}: guest minor faults = distinct pages touched"
        );
        let host = report.tasks[task].host.expect("task attributed");
        assert!(
            host.host_min_flt >= last.min_flt,
            "task {task}: every guest first touch is a host fault, yet host {} < guest {}",
            host.host_min_flt,
            last.min_flt
        );
        eprintln!(
            "task {task}: guest min_flt {}, host faults {}",
            last.min_flt, host.host_min_flt
        );
    }
}

/// At 1 kHz the sampler reads a vCPU thread's `/proc` stat line (its costliest read) only when
/// the thread may have faulted since the tick before: through a long phase of guest code on
/// pages the guest already has, most ticks skip it. No fault is lost or counted twice on the
/// way: the host faults the records charge add up to the vCPU thread's own count.
#[test]
fn quiet_ticks_skip_the_stat_line_and_lose_no_fault() {
    if !kvm_available("quiet_ticks_skip_the_stat_line_and_lose_no_fault") {
        return;
    }
    // 4,096 first touches, then 20 million random reads of those pages.
    let Run {
        report, regions, ..
    } = run_workload(&["work 16 R 20000000 1"], 1, Duration::from_millis(1));
    let sampler = report.sampler.clone().expect("sampler report");
    assert!(sampler.vcpu_reads >= 100, "{sampler:?}");
    assert!(
        sampler.stat_reads * 2 < sampler.vcpu_reads,
        "most ticks should skip the stat line: {sampler:?}"
    );
    assert!(sampler.wait_reads < sampler.vcpu_reads, "{sampler:?}");
    let host = validate_host_region(regions.host.region().expect("region")).expect("host region");
    let (records, lost): (Vec<(u64, HostSample)>, u64) = drain(host.ring());
    assert_eq!(lost, 0);
    let charged: u64 = records.iter().map(|(_, s)| s.host_min_flt).sum();
    let own = report.vcpus[0].host_minor_faults;
    assert!(charged >= 4096, "charged {charged}, own {own}");
    assert!(
        charged <= own && own - charged <= 64,
        "records charge {charged} host faults, the vCPU thread counted {own}"
    );
    eprintln!("{sampler:?}; charged {charged} of {own} host faults");
}
