//! A writer at full speed against concurrent readers: readers never accept a record whose payload
//! does not belong to its sequence number, never see a torn seqlocked entry, and account for
//! every sequence number (read or lost).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use common::*;
use mirrorball_profiler_abi::*;

/// Polls `reader` until the writer is done and everything up to `total` is accounted for.
/// Returns (records read, records lost).
fn drain<R, F>(mut reader: RingReader<'_, R>, total: u64, done: &AtomicBool, check: F) -> (u64, u64)
where
    R: SampleRecord,
    F: Fn(u64) -> R,
{
    let mut last = 0u64;
    loop {
        match reader.poll() {
            Poll::Record(rec) => {
                assert!(
                    rec.seq > last,
                    "sequence went backwards: {} after {last}",
                    rec.seq
                );
                assert_eq!(
                    rec.record,
                    check(rec.seq),
                    "payload of record {} is not its own",
                    rec.seq
                );
                last = rec.seq;
            }
            Poll::Lost { first, count } => {
                assert!(count > 0);
                assert!(
                    first > last,
                    "lost range starts at {first} after record {last}"
                );
                last = first + count - 1;
            }
            Poll::Empty => {
                if done.load(Ordering::Acquire) && reader.next_seq() == total + 1 {
                    break;
                }
                std::hint::spin_loop();
            }
            Poll::Regressed { .. } => panic!("the head never moves backwards here"),
        }
    }
    assert_eq!(
        reader.read_count() + reader.lost_count(),
        total,
        "every record read or lost"
    );
    (reader.read_count(), reader.lost_count())
}

#[test]
fn full_speed_writer_and_two_readers_never_see_a_wrong_payload() {
    const TOTAL: u64 = if cfg!(miri) { 2_000 } else { 400_000 };
    for capacity in [8u32, 256] {
        let (mem, _) = guest_memory(1, 1, capacity);
        let done = AtomicBool::new(false);
        let random_hits = AtomicU64::new(0);
        thread::scope(|s| {
            let mem = &mem;
            let done = &done;
            let random_hits = &random_hits;
            s.spawn(move || {
                let region = GuestRegion::attach(RegionMut::from_atomic_words(mem)).unwrap();
                let mut w = region.ring_writer().unwrap();
                for seq in 1..=TOTAL {
                    assert_eq!(w.push(&guest_sample_for(seq)), seq);
                }
                done.store(true, Ordering::Release);
            });
            // Reader 1: sequential, via RingReader.
            let r1 = s.spawn(move || {
                let view = validate_guest_region(Region::from_atomic_words(mem)).unwrap();
                drain(
                    RingReader::starting_at(view.ring(), SEQ_FIRST),
                    TOTAL,
                    done,
                    guest_sample_for,
                )
            });
            // Reader 2: random access just behind the head, where overwrites race the copy.
            let r2 = s.spawn(move || {
                let view = validate_guest_region(Region::from_atomic_words(mem)).unwrap();
                let ring = view.ring();
                let mut rng = Rng(capacity.into());
                let (mut ok, mut torn, mut over, mut not_yet) = (0u64, 0u64, 0u64, 0u64);
                while !done.load(Ordering::Acquire) {
                    let head = ring.head();
                    let back = rng.below(u64::from(capacity) + 2);
                    let seq = head.saturating_sub(back).max(1);
                    match ring.read(seq) {
                        Ok(rec) => {
                            assert_eq!(rec.seq, seq);
                            assert_eq!(rec.record, guest_sample_for(seq));
                            ok += 1;
                        }
                        Err(ReadError::Torn) => torn += 1,
                        Err(ReadError::Overwritten) => over += 1,
                        Err(ReadError::NotYetWritten) => not_yet += 1,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
                random_hits.store(ok, Ordering::Relaxed);
                (ok, torn, over, not_yet)
            });
            let (read, lost) = r1.join().unwrap();
            let (ok, torn, over, not_yet) = r2.join().unwrap();
            println!(
                "capacity {capacity}: sequential reader {read} read + {lost} lost = {TOTAL}; \
                 random reader {ok} ok, {torn} torn, {over} overwritten, {not_yet} not yet written"
            );
        });
        assert!(random_hits.load(Ordering::Relaxed) > 0);
    }
}

#[test]
fn a_reader_that_keeps_up_loses_nothing() {
    // A writer throttled to stay within half a ring of the reader (as a 1 kHz sampler is, against
    // a monitor polling every few ms): the reader must account for every record as read.
    const TOTAL: u64 = if cfg!(miri) { 2_000 } else { 200_000 };
    let (mem, _) = host_memory(2, 1024);
    let done = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    thread::scope(|s| {
        let (mem, done, progress) = (&mem, &done, &progress);
        s.spawn(move || {
            let region = HostRegion::attach(RegionMut::from_atomic_words(mem)).unwrap();
            let mut w = region.ring_writer().unwrap();
            for seq in 1..=TOTAL {
                while seq - progress.load(Ordering::Acquire) > 512 {
                    thread::yield_now();
                }
                w.push(&host_sample_for(seq));
            }
            done.store(true, Ordering::Release);
        });
        let reader = s.spawn(move || {
            let view = validate_host_region(Region::from_atomic_words(mem)).unwrap();
            let mut r = view.ring().reader();
            let mut last = 0;
            while !(done.load(Ordering::Acquire) && r.next_seq() == TOTAL + 1) {
                match r.poll() {
                    Poll::Record(rec) => {
                        assert_eq!(rec.seq, last + 1, "gap after {last}");
                        assert_eq!(rec.record, host_sample_for(rec.seq));
                        last = rec.seq;
                        progress.store(last, Ordering::Release);
                    }
                    Poll::Empty => thread::yield_now(),
                    other => panic!("{other:?}"),
                }
            }
            (r.read_count(), r.lost_count())
        });
        assert_eq!(reader.join().unwrap(), (TOTAL, 0));
    });
}

/// A task whose every field is derived from `k`.
fn task_for(k: u64) -> CurrentTask {
    let mut comm = [0u8; 16];
    comm[..8].copy_from_slice(&k.to_le_bytes());
    comm[8..].copy_from_slice(&(!k).to_le_bytes());
    CurrentTask {
        task_id: (k & 0xffff_ffff) as u32,
        pid: ((k & 0xffff_ffff) as u32).wrapping_mul(3),
        tgid: ((k & 0xffff_ffff) as u32) ^ 0xffff,
        flags: (k % 4) as u32,
        comm,
    }
}

#[test]
fn seqlocked_vcpu_slot_is_never_read_torn() {
    const SWITCHES: u64 = if cfg!(miri) { 1_000 } else { 300_000 };
    let (mem, _) = guest_memory(2, 1, 1);
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let (mem, done) = (&mem, &done);
        s.spawn(move || {
            let region = GuestRegion::attach(RegionMut::from_atomic_words(mem)).unwrap();
            let mut slot = region.vcpu_writer(1).unwrap();
            for k in 1..=SWITCHES {
                slot.switch_to(&task_for(k), k * 10);
            }
            done.store(true, Ordering::Release);
        });
        for _ in 0..2 {
            s.spawn(move || {
                let view = validate_guest_region(Region::from_atomic_words(mem)).unwrap();
                let (mut ok, mut busy, mut last) = (0u64, 0u64, 0u64);
                loop {
                    let finished = done.load(Ordering::Acquire);
                    match view.vcpu(1) {
                        Ok(state) => {
                            let k = state.switch_count;
                            assert!(k >= last, "switch count went backwards");
                            if k > 0 {
                                assert_eq!(state.task, task_for(k), "torn slot at switch {k}");
                                assert_eq!(state.switch_time_ns, k * 10);
                            }
                            last = k;
                            ok += 1;
                        }
                        Err(ReadError::Busy) => busy += 1,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                    if finished {
                        break;
                    }
                }
                assert_eq!(last, SWITCHES);
                println!("vCPU slot reader: {ok} consistent snapshots, {busy} busy");
            });
        }
    });
}

#[test]
fn seqlocked_task_entries_are_never_read_torn() {
    const ROUNDS: u32 = if cfg!(miri) { 300 } else { 50_000 };
    let (mem, _) = guest_memory(1, 4, 1);
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let (mem, done) = (&mem, &done);
        s.spawn(move || {
            let region = GuestRegion::attach(RegionMut::from_atomic_words(mem)).unwrap();
            let mut t = region.task_table();
            for round in 1..=ROUNDS {
                let pid = round * 2;
                let id = t
                    .register(pid, pid + 1, &comm_from(&pid.to_le_bytes()), u64::from(pid))
                    .unwrap();
                t.unregister(id, u64::from(pid) + 1).unwrap();
            }
            done.store(true, Ordering::Release);
        });
        s.spawn(move || {
            let view = validate_guest_region(Region::from_atomic_words(mem)).unwrap();
            let mut checked = 0u64;
            while !done.load(Ordering::Acquire) {
                for (_, entry) in view.tasks() {
                    let Ok(t) = entry else { continue };
                    if t.state == TASK_FREE {
                        continue;
                    }
                    assert_eq!(t.tgid, t.pid + 1);
                    assert_eq!(t.comm, comm_from(&t.pid.to_le_bytes()));
                    assert_eq!(t.registered_ns, u64::from(t.pid));
                    match t.state {
                        TASK_REGISTERED => assert_eq!(t.unregistered_ns, 0),
                        TASK_UNREGISTERED => assert_eq!(t.unregistered_ns, u64::from(t.pid) + 1),
                        other => panic!("state {other}"),
                    }
                    checked += 1;
                }
            }
            println!("task table reader: {checked} consistent entries");
        });
    });
}
