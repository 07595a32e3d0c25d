//! A guest that scribbles over its whole region while the host polls it: every poll returns
//! promptly with bounded output, nothing panics, the model stays bounded.
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{temp_dir, Rng};
use mirrorball_monitor::publish::{PublishSpec, PublishedVm};
use mirrorball_monitor::{ModelConfig, PollLimits, VmHandle, VmModel};
use mirrorball_profiler_abi::{GuestSample, HostSample, SEQ_WRITING};

const ROUNDS: usize = 3000;
const STEPS: usize = 512;

fn interesting(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0 => 0,
        1 => u64::MAX,
        2 => SEQ_WRITING | rng.below(1 << 20),
        3 => rng.below(1 << 32),
        4 => u64::from(u32::MAX),
        5 => 1,
        _ => rng.next(),
    }
}

#[test]
fn hostile_guest_region_cannot_hang_or_crash_the_reader() {
    let dir = temp_dir("hostile");
    let vm = PublishedVm::create(
        &dir,
        &PublishSpec {
            vcpus: 4,
            tasks: 16,
            guest_ring: 128,
            host_ring: 128,
            ..PublishSpec::default()
        },
    )
    .expect("publish");
    let handle = VmHandle::new(&dir, vm.id());
    let mut reader = handle.open().expect("open");
    let cfg = ModelConfig {
        history: 16,
        max_tasks: 64,
        expire_windows: 8,
    };
    let mut model = VmModel::new(vm.id(), cfg);
    let raw = vm.guest_raw().expect("raw").as_region();
    let words = raw.len() / 8;
    let base = raw.as_ptr().cast::<AtomicU64>();
    // SAFETY: the mapping lives as long as `vm`; 8-aligned; this test writes it only through
    // atomics (the ABI crate's writers use atomics too).
    let word = |i: usize| unsafe { &*base.add(i % words) };
    let layout = *reader.guest_view().expect("valid at open").layout();
    let head_word = layout.ring.ctl_offset / 8;
    let hot: Vec<usize> = (0..layout.ring.slots.offset.min(words * 8) / 8).collect();

    let guest = vm.guest().expect("guest");
    let host = vm.host().expect("host");
    let mut gw = guest.ring_writer().expect("guest writer");
    let mut hw = host.ring_writer().expect("host writer");
    let mut rng = Rng(0x0dd_ba11_5eed_1e55);
    let mut slowest = Duration::ZERO;
    let (mut guest_seen, mut host_seen, mut lost) = (0usize, 0usize, 0u64);
    let started = Instant::now();
    for round in 0..ROUNDS {
        // Some well-formed traffic from writers that attached before the scribbling started
        // (they keep their own layout and sequence numbers, as a guest driver does).
        for _ in 0..rng.below(8) {
            gw.push(&GuestSample {
                timestamp_ns: rng.next(),
                task_id: u32::try_from(rng.below(40)).expect("fits"),
                pid: u32::try_from(rng.below(40)).expect("fits"),
                min_flt: rng.next(),
                maj_flt: rng.next(),
                utime_ns: rng.next(),
                stime_ns: rng.next(),
                cpu: (rng.next() & 0xffff_ffff) as u32,
                flags: (rng.next() & 0xffff_ffff) as u32,
            });
        }
        for _ in 0..rng.below(4) {
            hw.push(&HostSample {
                vcpu: u32::try_from(rng.below(6)).expect("fits"),
                task_id: (rng.next() & 0xffff_ffff) as u32,
                pid: (rng.next() & 0xffff_ffff) as u32,
                interval_ns: rng.below(1 << 30),
                pf_taken: rng.below(1000),
                ..HostSample::default()
            });
        }
        // Scribbles: anywhere, in the header/tables, and on the ring head.
        for _ in 0..rng.below(6) {
            let i = match rng.below(12) {
                0 => head_word,
                1 | 2 => hot[usize::try_from(rng.below(hot.len() as u64)).expect("fits")],
                _ => usize::try_from(rng.below(words as u64)).expect("fits"),
            };
            word(i).store(interesting(&mut rng), Ordering::Relaxed);
        }
        let t = Instant::now();
        let batch = reader
            .poll_with(PollLimits {
                guest_steps: STEPS,
                host_steps: STEPS,
            })
            .expect("the file did not shrink");
        let _ = reader.vcpus();
        let _ = reader.tasks();
        let _ = reader.task((rng.next() & 0xffff_ffff) as u32);
        let _ = reader.guest_period_ns();
        let _ = reader.status();
        slowest = slowest.max(t.elapsed());
        assert!(batch.guest.len() <= STEPS && batch.host.len() <= STEPS);
        guest_seen += batch.guest.len();
        host_seen += batch.host.len();
        lost = lost.saturating_add(batch.lost_guest);
        model.ingest_batch(&batch);
        if round % 25 == 0 {
            model.end_window();
        }
        assert!(model.tasks.len() <= cfg.max_tasks);
        assert!(model.vcpus.len() <= 4096);
    }
    let (g_changes, _) = reader.header_changes();
    eprintln!(
        "{ROUNDS} rounds in {:?}: {guest_seen} guest and {host_seen} host records, {lost} guest \
         records lost, {} regressions, {g_changes} guest header changes, slowest poll {slowest:?}",
        started.elapsed(),
        reader.regressions(),
    );
    assert!(slowest < Duration::from_secs(1), "slowest poll {slowest:?}");
    assert!(
        host_seen > 0,
        "the host ring is not guest-writable and keeps working"
    );
    assert!(
        guest_seen > 0,
        "some guest records get through between scribbles"
    );
    assert!(g_changes > 0, "header scribbles are noticed");
}
