//! Unit tests of the host sampler: stopping, the thread's policy, the procfs parsers.
use super::*;

#[test]
fn stopping_does_not_wait_for_the_period() {
    let dir = std::env::temp_dir().join(format!("mb-sampler-stop-{}", std::process::id()));
    let regions = Arc::new(ProfilerRegions::create(&dir, 1, "workload", 1).expect("regions"));
    // An hour between ticks: a sampler that slept its period before noticing would hang.
    let sampler = Sampler::spawn(
        regions,
        Vec::new(),
        Duration::from_secs(3600),
        None,
        AttributionMode::Exact,
        Default::default(),
    )
    .expect("spawn");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sampler.stop());
    });
    let report = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the sampler stopped at once, not after its period");
    assert_eq!(report.ticks, 1, "one last tick: {report:?}");
}

#[test]
fn task_stat_fields_survive_odd_command_names() {
    let line = "1234 (vcpu 0) x) R 1 2 3 4 5 6 77 8 99 10 300 400 0 0 20 0 1 0 100 0 0";
    let c = parse_task_stat(line, 10_000_000).expect("parse");
    assert_eq!((c.min_flt, c.maj_flt), (77, 99));
    assert_eq!((c.utime_ns, c.stime_ns), (3_000_000_000, 4_000_000_000));
    assert_eq!(parse_task_stat("garbage", 1), None);
    assert_eq!(parse_task_stat("1 (x) R 1 2", 1), None);
}

#[test]
fn schedstat_wait_is_its_second_field() {
    assert_eq!(parse_schedstat_wait("1505128 2086811 2\n"), Some(2_086_811));
    assert_eq!(parse_schedstat_wait("1505128"), None);
    assert_eq!(parse_schedstat_wait("a b c"), None);
    // This thread's own, as the probe reads it.
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let line =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).expect("schedstat");
    assert!(parse_schedstat_wait(&line).is_some(), "{line}");
}

#[test]
fn the_sampler_thread_never_preempts_a_vcpu() {
    let policy = std::thread::spawn(|| {
        yield_to_vcpus();
        // SAFETY: sched_getscheduler(0) reads the calling thread's policy.
        unsafe { libc::sched_getscheduler(0) }
    })
    .join()
    .expect("thread");
    assert_eq!(policy, libc::SCHED_BATCH);
}

#[test]
fn own_thread_faults_are_read_from_proc() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // The sampler's way: one file kept open and read again each tick.
    let mut cache = None;
    let before = read_thread_cached(&mut cache, tid, 10_000_000).expect("own thread");
    let pages = 64;
    // SAFETY: a private anonymous mapping, touched once per page and unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            pages * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        for i in 0..pages {
            std::ptr::write_volatile(p.cast::<u8>().add(i * 4096), 1);
        }
        libc::munmap(p, pages * 4096);
    }
    let after = read_thread_cached(&mut cache, tid, 10_000_000).expect("own thread");
    assert!(
        after.min_flt >= before.min_flt + pages as u64,
        "{before:?} -> {after:?}"
    );
    // A fresh open agrees with the kept one.
    let fresh = read_thread(tid, 10_000_000).expect("own thread");
    assert!(fresh.min_flt >= after.min_flt, "{after:?} vs {fresh:?}");
    assert_eq!(
        read_thread_cached(&mut cache, 0, 1),
        None,
        "no thread id yet"
    );
    assert!(cache.is_none());
}
