//! Sample ring, vCPU slots and task table, single-threaded.

mod common;

use common::*;
use mirrorball_profiler_abi::*;

fn expect_record<R: std::fmt::Debug + Copy>(p: Poll<R>) -> SeqRecord<R> {
    match p {
        Poll::Record(r) => r,
        other => panic!("expected a record, got {other:?}"),
    }
}

#[test]
fn guest_ring_round_trip() {
    let (mem, _) = guest_memory(2, 8, 64);
    let region = GuestRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
    let mut w = region.ring_writer().unwrap();
    let view = validate_guest_region(Region::from_atomic_words(&mem)).unwrap();
    let mut r = view.ring().reader();
    assert_eq!(r.poll(), Poll::Empty);
    assert_eq!(view.ring().read(1), Err(ReadError::NotYetWritten));

    for seq in 1..=50 {
        assert_eq!(w.push(&guest_sample_for(seq)), seq);
    }
    assert_eq!(view.ring().head(), 51);
    for seq in 1..=50 {
        let rec = expect_record(r.poll());
        assert_eq!(rec.seq, seq);
        assert_eq!(rec.record, guest_sample_for(seq));
        // Random access agrees.
        assert_eq!(view.ring().read(seq), Ok(rec));
    }
    assert_eq!(r.poll(), Poll::Empty);
    assert_eq!((r.read_count(), r.lost_count()), (50, 0));
    assert_eq!(view.ring().read(0), Err(ReadError::OutOfRange));
    assert_eq!(
        view.ring().read(SEQ_WRITING | 3),
        Err(ReadError::OutOfRange)
    );
    assert_eq!(view.ring().read(51), Err(ReadError::NotYetWritten));
}

#[test]
fn host_ring_round_trip() {
    let (mem, _) = host_memory(4, 16);
    let region = HostRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
    let mut w = region.ring_writer().unwrap();
    let view = region.view().unwrap();
    let mut r = view.ring().reader();
    for round in 0..5u64 {
        // Interleave writes and reads across several wraps of the 16-record ring.
        for seq in round * 10 + 1..=round * 10 + 10 {
            assert_eq!(w.push(&host_sample_for(seq)), seq);
        }
        for seq in round * 10 + 1..=round * 10 + 10 {
            let rec = expect_record(r.poll());
            assert_eq!((rec.seq, rec.record), (seq, host_sample_for(seq)));
        }
        assert_eq!(r.poll(), Poll::Empty);
    }
    assert_eq!(r.lost_count(), 0);
}

#[test]
fn a_lagging_reader_sees_overwritten_and_resynchronises_to_the_oldest_record() {
    let (mem, _) = guest_memory(1, 1, 8);
    let region = GuestRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
    let mut w = region.ring_writer().unwrap();
    let view = region.view().unwrap();
    let ring = view.ring();
    let mut r = ring.reader();
    for seq in 1..=3 {
        w.push(&guest_sample_for(seq));
    }
    assert_eq!(expect_record(r.poll()).seq, 1);
    // The writer laps the reader: 20 records in an 8-record ring.
    for seq in 4..=23 {
        w.push(&guest_sample_for(seq));
    }
    assert_eq!(ring.head(), 24);
    assert_eq!(ring.oldest(24), 16);
    assert_eq!(ring.read(2), Err(ReadError::Overwritten));
    assert_eq!(ring.read(15), Err(ReadError::Overwritten));
    assert_eq!(ring.read(16).unwrap().record, guest_sample_for(16));
    assert_eq!(
        r.poll(),
        Poll::Lost {
            first: 2,
            count: 14
        }
    );
    for seq in 16..=23 {
        let rec = expect_record(r.poll());
        assert_eq!((rec.seq, rec.record), (seq, guest_sample_for(seq)));
    }
    assert_eq!(r.poll(), Poll::Empty);
    assert_eq!((r.read_count(), r.lost_count()), (9, 14));
    // Every sequence number is accounted for.
    assert_eq!(r.read_count() + r.lost_count(), 23);

    // A reader created late starts at the oldest record; one from the head sees only new ones.
    let mut late = ring.reader();
    assert_eq!(late.next_seq(), 16);
    let mut live = ring.reader_from_head();
    assert_eq!(live.poll(), Poll::Empty);
    w.push(&guest_sample_for(24));
    assert_eq!(expect_record(live.poll()).seq, 24);
    assert_eq!(
        late.poll(),
        Poll::Lost {
            first: 16,
            count: 1
        },
        "24 replaced 16"
    );
    assert_eq!(expect_record(late.poll()).seq, 17);
}

#[test]
fn a_reader_between_the_checks_is_told_overwritten_or_torn() {
    // Simulate the writer's intermediate states by hand.
    let (mem, layout) = guest_memory(1, 1, 4);
    let region = GuestRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
    let mut w = region.ring_writer().unwrap();
    for seq in 1..=4 {
        w.push(&guest_sample_for(seq));
    }
    let ring = region.view().unwrap().ring();
    let slot_of =
        |seq: u64| layout.ring.slots.offset + (seq % 4) as usize * layout.ring.slots.stride;
    // Record 5 is being written into record 1's slot.
    poke(&mem, slot_of(5), 8, SEQ_WRITING | 5);
    assert_eq!(ring.read(1), Err(ReadError::Overwritten));
    assert_eq!(ring.read(5), Err(ReadError::NotYetWritten));
    // A slot that went backwards (a broken writer) is "not yet written", and a reader whose head
    // says otherwise counts it lost instead of waiting for ever.
    poke(&mem, slot_of(2), 8, 0);
    assert_eq!(ring.read(2), Err(ReadError::NotYetWritten));
    let mut r = RingReader::starting_at(ring, 2);
    assert_eq!(r.poll(), Poll::Lost { first: 2, count: 1 });
    assert_eq!(expect_record(r.poll()).seq, 3);
}

#[test]
fn writers_continue_at_the_head_and_readers_notice_a_reformat() {
    let (mem, layout) = guest_memory(1, 1, 16);
    {
        let region = GuestRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
        let mut w = region.ring_writer().unwrap();
        for seq in 1..=10 {
            w.push(&guest_sample_for(seq));
        }
    }
    // A new writer (e.g. the driver reloaded) keeps the sequence monotonic.
    let region = GuestRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
    let mut w = region.ring_writer().unwrap();
    assert_eq!(w.next_seq(), 11);
    assert_eq!(w.capacity(), 16);
    assert_eq!(w.push(&guest_sample_for(11)), 11);

    let view = validate_guest_region(Region::from_atomic_words(&mem)).unwrap();
    let mut r = view.ring().reader_from_head();
    assert_eq!(r.next_seq(), 12);
    // Reformatting (new generation) resets the head: the view notices on revalidate, the
    // reader as a regression.
    let init = RegionInit {
        generation: 99,
        ..RegionInit::default()
    };
    GuestRegion::format(RegionMut::from_atomic_words(&mem), &layout, &init).unwrap();
    assert_eq!(view.revalidate(), Err(AbiError::LayoutChanged));
    assert_eq!(r.poll(), Poll::Regressed { from: 12, head: 1 });
    assert_eq!(r.poll(), Poll::Empty);

    // A head that a writer cannot continue from is refused.
    poke(&mem, layout.ring.ctl_offset, 8, 0);
    assert_eq!(
        GuestRegion::attach(RegionMut::from_atomic_words(&mem))
            .unwrap()
            .ring_writer()
            .unwrap_err(),
        AbiError::BadHead(0)
    );
    poke(&mem, layout.ring.ctl_offset, 8, SEQ_WRITING);
    assert!(matches!(
        GuestRegion::attach(RegionMut::from_atomic_words(&mem))
            .unwrap()
            .ring_writer(),
        Err(AbiError::BadHead(_))
    ));
}

#[test]
fn vcpu_slots_follow_context_switches() {
    let (mem, layout) = guest_memory(2, 4, 4);
    let region = GuestRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
    let view = region.view().unwrap();
    let mut v1 = region.vcpu_writer(1).unwrap();
    assert_eq!(
        region.vcpu_writer(2).unwrap_err(),
        AbiError::IndexOutOfRange {
            index: 2,
            capacity: 2
        }
    );
    let work = CurrentTask {
        task_id: 3,
        pid: 1234,
        tgid: 1230,
        flags: 0,
        comm: comm_from(b"work"),
    };
    v1.switch_to(&work, 1_000);
    let idle = CurrentTask {
        pid: 0,
        flags: VCPU_IDLE,
        comm: comm_from(b"swapper/1"),
        ..CurrentTask::default()
    };
    v1.switch_to(&idle, 2_000);
    v1.switch_to(&work, 3_000);
    let s = view.vcpu(1).unwrap();
    assert_eq!(s.task, work);
    assert_eq!(s.switch_count, 3);
    assert_eq!(s.switch_time_ns, 3_000);
    assert_eq!(comm_bytes(&s.task.comm), b"work");
    assert_eq!(v1.state().unwrap(), s);
    assert_eq!(view.vcpu(0).unwrap().switch_count, 0);
    assert_eq!(view.vcpu(2), Err(ReadError::OutOfRange));
    // Seqlock: 3 writes → seq 6.
    assert_eq!(peek(&mem, layout.vcpus.offset + layout.vcpus.stride, 8), 6);

    // A slot left odd (a writer mid-update, or a hostile guest) gives Busy after bounded retries
    // and is attributed as such.
    poke(&mem, layout.vcpus.offset + layout.vcpus.stride, 8, 7);
    assert_eq!(view.vcpu(1), Err(ReadError::Busy));
    let a = Attribution::from_slot(view.vcpu(1), Some(3));
    assert_eq!(
        (a.task_id, a.pid, a.attr_flags),
        (TASK_NONE, 0, ATTR_SLOT_BUSY)
    );
    // The writer recovers the slot at its next switch.
    v1.switch_to(&work, 4_000);
    assert_eq!(view.vcpu(1).unwrap().switch_count, 4);

    let a = Attribution::from_slot(view.vcpu(1), Some(3));
    assert_eq!(
        (a.task_id, a.pid, a.attr_flags, a.guest_switch_count),
        (3, 1234, ATTR_SLOT_VALID | ATTR_SWITCHED, 4)
    );
    let a = Attribution::from_slot(view.vcpu(1), Some(4));
    assert_eq!(a.attr_flags, ATTR_SLOT_VALID);
    let mut h = host_sample_for(1);
    h.set_attribution(&a);
    assert_eq!(
        (h.task_id, h.pid, h.attr_flags, h.guest_switch_count),
        (3, 1234, ATTR_SLOT_VALID, 4)
    );

    v1.clear();
    assert_eq!(view.vcpu(1).unwrap(), VcpuState::default());
}

#[test]
fn task_table_registration() {
    let (mem, _) = guest_memory(1, 3, 4);
    let region = GuestRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
    let view = region.view().unwrap();
    let mut t = region.task_table();
    assert_eq!(t.capacity(), 3);
    let a = t.register(100, 100, &comm_from(b"work-a"), 10).unwrap();
    let b = t
        .register(200, 200, &comm_from(b"a-very-long-command-name"), 20)
        .unwrap();
    let c = t.register(300, 299, &comm_from(b"c"), 30).unwrap();
    assert_eq!((a, b, c), (0, 1, 2));
    assert_eq!(
        t.register(200, 200, &comm_from(b"x"), 40),
        Err(AbiError::AlreadyRegistered(1))
    );
    assert_eq!(
        t.register(400, 400, &comm_from(b"d"), 40),
        Err(AbiError::TableFull)
    );
    assert_eq!(t.find(300), Some(2));
    assert_eq!(t.find(999), None);

    let info = view.task(b).unwrap();
    assert!(info.is_registered());
    assert_eq!((info.pid, info.tgid, info.registered_ns), (200, 200, 20));
    assert_eq!(
        comm_bytes(&info.comm),
        b"a-very-long-com",
        "truncated to 15 bytes + NUL"
    );
    assert_eq!(t.get(b).unwrap(), info);

    // Unregistering keeps the entry readable; reuse picks the one unregistered longest ago.
    t.unregister(c, 50).unwrap();
    t.unregister(a, 60).unwrap();
    assert_eq!(t.unregister(a, 61), Err(AbiError::NotRegistered(a)));
    assert_eq!(
        t.unregister(7, 61),
        Err(AbiError::IndexOutOfRange {
            index: 7,
            capacity: 3
        })
    );
    let gone = view.task(c).unwrap();
    assert_eq!(
        (gone.state, gone.pid, gone.unregistered_ns),
        (TASK_UNREGISTERED, 300, 50)
    );
    assert_eq!(t.find(300), None);
    assert_eq!(t.register(500, 500, &comm_from(b"e"), 70), Ok(c));
    assert_eq!(t.register(600, 600, &comm_from(b"f"), 80), Ok(a));
    let registered: Vec<u32> = view
        .tasks()
        .filter_map(|(id, t)| t.unwrap().is_registered().then_some(id))
        .collect();
    assert_eq!(registered, [0, 1, 2]);
    assert_eq!(view.task(3), Err(ReadError::OutOfRange));

    // After a guest reboot the driver clears the tables but keeps the ring going.
    let mut w = region.ring_writer().unwrap();
    w.push(&guest_sample_for(1));
    region.set_guest_boot_id(77);
    region.set_sample_period_ns(1_000_000);
    region.clear_tables().unwrap();
    assert!(view.tasks().all(|(_, t)| t.unwrap().state == TASK_FREE));
    assert_eq!(view.vcpu(0).unwrap().task.task_id, TASK_NONE);
    assert_eq!(view.ring().head(), 2);
    assert_eq!(view.guest_boot_id(), 77);
    assert_eq!(view.sample_period_ns(), 1_000_000);
}

#[test]
fn comm_helpers() {
    assert_eq!(comm_from(b""), [0; 16]);
    assert_eq!(comm_bytes(&comm_from(b"kworker/0:1")), b"kworker/0:1");
    // An unterminated name from a hostile guest is all 16 bytes.
    assert_eq!(comm_bytes(&[b'x'; 16]), [b'x'; 16]);
}
