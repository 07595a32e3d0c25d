//! Layout computation and header validation of well-formed regions.

mod common;

use common::*;
use mirrorball_profiler_abi::*;

#[test]
fn record_and_header_sizes() {
    use std::mem::size_of;
    assert_eq!(size_of::<CommonHeader>(), 64);
    assert_eq!(size_of::<GuestHeader>(), 256);
    assert_eq!(size_of::<HostHeader>(), 256);
    assert_eq!(size_of::<RingCtl>(), 64);
    assert_eq!(size_of::<VcpuSlot>(), 64);
    assert_eq!(size_of::<TaskEntry>(), 64);
    assert_eq!(size_of::<GuestSampleSlot>(), 64);
    assert_eq!(size_of::<HostSampleSlot>(), 128);
    for s in STRUCTS {
        assert_eq!(s.align, 8, "{}", s.rust_name);
        let total: usize = s.fields.iter().map(|f| f.size).sum();
        assert_eq!(total, s.size, "{} has padding", s.rust_name);
    }
}

#[test]
fn guest_layout_is_packed_cache_line_aligned_and_page_rounded() {
    let l = GuestRegionLayout::new(2, 256, 12_000).unwrap();
    assert_eq!(l.header_size, 256);
    assert_eq!(
        l.vcpus,
        TableLayout {
            offset: 256,
            capacity: 2,
            stride: 64
        }
    );
    assert_eq!(
        l.tasks,
        TableLayout {
            offset: 384,
            capacity: 256,
            stride: 64
        }
    );
    assert_eq!(l.ring.ctl_offset, 384 + 256 * 64);
    assert_eq!(l.ring.slots.offset, l.ring.ctl_offset + 64);
    assert_eq!(l.ring.slots.capacity, 12_000);
    assert_eq!(l.ring.slots.stride, 64);
    let end = l.ring.slots.offset + 12_000 * 64;
    assert_eq!(l.size, end.div_ceil(4096) * 4096);
    assert_eq!(l.vcpu_count(), 2);

    // Odd vCPU counts still start every part on a cache line.
    let l = GuestRegionLayout::new(3, 1, 1).unwrap();
    assert_eq!(l.tasks.offset % 64, 0);
    assert_eq!(l.ring.ctl_offset % 64, 0);
    assert_eq!(l.size, 4096);
}

#[test]
fn host_layout() {
    let l = HostRegionLayout::new(4, 600_000).unwrap();
    assert_eq!(l.vcpu_count, 4);
    assert_eq!(l.ring.ctl_offset, 256);
    assert_eq!(l.ring.slots.offset, 320);
    assert_eq!(l.ring.slots.stride, 128);
    assert_eq!(l.size, (320 + 600_000 * 128usize).div_ceil(4096) * 4096);
}

#[test]
fn layouts_reject_zero_and_too_large_capacities() {
    assert_eq!(
        GuestRegionLayout::new(0, 1, 1),
        Err(AbiError::BadVcpuCount(0))
    );
    assert_eq!(
        GuestRegionLayout::new(1, 0, 1),
        Err(AbiError::ZeroCapacity(Part::Tasks))
    );
    assert_eq!(
        GuestRegionLayout::new(1, 1, 0),
        Err(AbiError::ZeroCapacity(Part::RingSlots))
    );
    assert_eq!(HostRegionLayout::new(0, 1), Err(AbiError::BadVcpuCount(0)));
    assert_eq!(
        HostRegionLayout::new(1, 0),
        Err(AbiError::ZeroCapacity(Part::RingSlots))
    );

    assert_eq!(
        GuestRegionLayout::new(MAX_VCPUS + 1, 1, 1),
        Err(AbiError::BadVcpuCount(MAX_VCPUS + 1))
    );
    assert!(matches!(
        GuestRegionLayout::new(1, MAX_TASKS + 1, 1),
        Err(AbiError::CapacityTooLarge {
            part: Part::Tasks,
            ..
        })
    ));
    assert!(matches!(
        GuestRegionLayout::new(1, 1, MAX_RING_RECORDS + 1),
        Err(AbiError::CapacityTooLarge {
            part: Part::RingSlots,
            ..
        })
    ));
    // Values that would overflow 32-bit (and, multiplied, 64-bit) size arithmetic.
    for (v, t, r) in [
        (u32::MAX, 1, 1),
        (1, u32::MAX, 1),
        (1, 1, u32::MAX),
        (u32::MAX, u32::MAX, u32::MAX),
    ] {
        assert!(GuestRegionLayout::new(v, t, r).is_err(), "{v} {t} {r}");
    }
    assert!(HostRegionLayout::new(u32::MAX, 1).is_err());
    assert!(HostRegionLayout::new(1, u32::MAX).is_err());

    // The limits themselves are fine and fit in 64-bit sizes.
    let l = GuestRegionLayout::new(MAX_VCPUS, MAX_TASKS, MAX_RING_RECORDS).unwrap();
    assert_eq!(l.size % 4096, 0);
    assert!(HostRegionLayout::new(MAX_VCPUS, MAX_RING_RECORDS).is_ok());
}

#[test]
fn formatted_regions_validate_to_their_layout() {
    let (mem, layout) = guest_memory(3, 17, 100);
    let view = validate_guest_region(Region::from_atomic_words(&mem)).unwrap();
    assert_eq!(*view.layout(), layout);
    let info = view.info();
    assert_eq!(
        (info.version_major, info.version_minor),
        (ABI_VERSION_MAJOR, ABI_VERSION_MINOR)
    );
    assert_eq!(info.generation, 0x1234_5678);
    assert_eq!(info.clock_id, CLOCK_MONOTONIC);
    assert_eq!(view.sample_period_ns(), 50_000_000);
    assert_eq!(view.vcpu_count(), 3);
    assert_eq!(view.task_capacity(), 17);
    assert_eq!(view.ring().capacity(), 100);
    assert_eq!(view.ring().head(), SEQ_FIRST);
    assert_eq!(view.guest_boot_id(), 0);
    view.revalidate().unwrap();
    // A fresh region: idle vCPU slots, free task entries, empty ring.
    let v = view.vcpu(0).unwrap();
    assert_eq!(v.task.task_id, TASK_NONE);
    assert_eq!(v.switch_count, 0);
    assert!(view.tasks().all(|(_, t)| t.unwrap().state == TASK_FREE));
    // The magic in memory is "MBGR".
    assert_eq!(peek(&mem, 0, 4).to_le_bytes()[..4], *b"MBGR");

    let (mem, layout) = host_memory(2, 50);
    let view = validate_host_region(Region::from_atomic_words(&mem)).unwrap();
    assert_eq!(*view.layout(), layout);
    assert_eq!(view.vcpu_count(), 2);
    assert_eq!(view.sample_period_ns(), 1_000_000);
    assert_eq!(peek(&mem, 0, 4).to_le_bytes()[..4], *b"MBHR");
    view.revalidate().unwrap();
}

#[test]
fn regions_are_not_interchangeable() {
    let (guest, _) = guest_memory(1, 1, 1);
    let (host, _) = host_memory(1, 1);
    assert_eq!(
        validate_host_region(Region::from_atomic_words(&guest)).unwrap_err(),
        AbiError::BadMagic {
            found: GUEST_MAGIC,
            expected: HOST_MAGIC
        }
    );
    assert_eq!(
        validate_guest_region(Region::from_atomic_words(&host)).unwrap_err(),
        AbiError::BadMagic {
            found: HOST_MAGIC,
            expected: GUEST_MAGIC
        }
    );
}

#[test]
fn format_checks_its_inputs() {
    let layout = GuestRegionLayout::new(1, 4, 8).unwrap();
    let small = memory(layout.size - 8);
    assert!(matches!(
        GuestRegion::format(
            RegionMut::from_atomic_words(&small),
            &layout,
            &RegionInit::default()
        ),
        Err(AbiError::TooSmall { .. })
    ));
    let mem = memory(layout.size);
    let mut odd = layout;
    odd.tasks.offset += 8;
    assert_eq!(
        GuestRegion::format(
            RegionMut::from_atomic_words(&mem),
            &odd,
            &RegionInit::default()
        )
        .unwrap_err(),
        AbiError::LayoutChanged
    );
    // Nothing was written.
    assert_eq!(peek(&mem, 0, 8), 0);

    let host = HostRegionLayout::new(1, 8).unwrap();
    let mut odd = host;
    odd.size += 4096;
    let mem = memory(odd.size);
    assert_eq!(
        HostRegion::format(
            RegionMut::from_atomic_words(&mem),
            &odd,
            &RegionInit::default()
        )
        .unwrap_err(),
        AbiError::LayoutChanged
    );
}

#[test]
fn raw_regions_check_alignment() {
    let mem = memory(64);
    let base = mem.as_ptr().cast::<u8>();
    // SAFETY: `mem` outlives the regions and is only accessed atomically.
    unsafe {
        assert!(Region::from_raw(base, 64).is_ok());
        assert_eq!(
            Region::from_raw(base.add(4), 32).unwrap_err(),
            AbiError::Misaligned
        );
        assert_eq!(
            Region::from_raw(std::ptr::null(), 0).unwrap_err(),
            AbiError::Misaligned
        );
        assert_eq!(
            RegionMut::from_raw(base.add(1).cast_mut(), 8).unwrap_err(),
            AbiError::Misaligned
        );
    }
    assert_eq!(
        validate_guest_region(Region::from_atomic_words(&mem)).unwrap_err(),
        AbiError::TooSmall {
            needed: 256,
            available: 64
        }
    );
}

#[test]
fn a_larger_mapping_and_a_newer_minor_version_are_accepted() {
    // The mapping may be larger than region_size (page rounding by the mapper).
    let layout = GuestRegionLayout::new(2, 8, 32).unwrap();
    let mem = memory(layout.size + 8192);
    GuestRegion::format(
        RegionMut::from_atomic_words(&mem),
        &layout,
        &RegionInit::default(),
    )
    .unwrap();
    validate_guest_region(Region::from_atomic_words(&mem)).unwrap();

    // A future minor version: bigger header (fields appended), bigger strides (fields appended
    // to records), parts moved accordingly. This reader still understands it.
    let (mem, _) = guest_memory(2, 8, 32);
    let gh = &GuestHeader::DESC;
    let (common_at, _) = field(gh, "common");
    let (minor_at, _) = field(&CommonHeader::DESC, "version_minor");
    let (hs_at, _) = field(&CommonHeader::DESC, "header_size");
    poke(&mem, common_at + minor_at, 2, 7);
    poke(&mem, common_at + hs_at, 4, 320);
    let (vcpus_at, _) = field(gh, "vcpus");
    let (tasks_at, _) = field(gh, "tasks");
    let (ring_at, _) = field(gh, "ring");
    let td = &TableDesc::DESC;
    let rd = &RingDesc::DESC;
    let off = |d, n| field(d, n).0;
    // vCPUs at 320, stride 128 (2 entries → 576); tasks at 576, stride 96 (8 → 1344);
    // ring ctl at 1344, slots at 1408 stride 72 (32 → 3712).
    poke(&mem, vcpus_at + off(td, "offset"), 8, 320);
    poke(&mem, vcpus_at + off(td, "stride"), 4, 128);
    poke(&mem, tasks_at + off(td, "offset"), 8, 576);
    poke(&mem, tasks_at + off(td, "stride"), 4, 96);
    poke(&mem, ring_at + off(rd, "ctl_offset"), 8, 1344);
    poke(&mem, ring_at + off(rd, "slots_offset"), 8, 1408);
    poke(&mem, ring_at + off(rd, "stride"), 4, 72);
    poke(&mem, 1344, 8, SEQ_FIRST);
    let region = GuestRegion::attach(RegionMut::from_atomic_words(&mem)).unwrap();
    assert_eq!(region.info().version_minor, 7);
    let mut w = region.ring_writer().unwrap();
    for seq in 1..=40 {
        assert_eq!(w.push(&guest_sample_for(seq)), seq);
    }
    let view = region.view().unwrap();
    assert_eq!(view.layout().ring.slots.stride, 72);
    let mut r = view.ring().reader();
    assert_eq!(r.next_seq(), 9);
    for seq in 9..=40 {
        match r.poll() {
            Poll::Record(rec) => assert_eq!((rec.seq, rec.record), (seq, guest_sample_for(seq))),
            other => panic!("{other:?}"),
        }
    }
    // Records landed at the new stride.
    assert_eq!(peek(&mem, 1408 + (40 % 32) * 72, 8), 40);
}

#[test]
fn paused_flag_round_trips_and_reads_false_from_older_writers() {
    let layout = HostRegionLayout::new(2, 8).unwrap();
    let mem = memory(layout.size);
    let host = HostRegion::format(
        RegionMut::from_atomic_words(&mem),
        &layout,
        &RegionInit::default(),
    )
    .unwrap();
    let view = host.view().unwrap();
    // Zero, as an older writer (minor < 3) leaves it: not paused.
    assert!(!view.paused());
    host.set_paused(true);
    assert!(view.paused());
    assert_eq!(peek(&mem, 152, 8), VM_PAUSED);
    host.set_paused(false);
    assert!(!view.paused());
    assert_eq!(peek(&mem, 152, 8), 0);
}

#[test]
fn formatting_zeroed_memory_writes_what_a_full_format_writes() {
    use std::sync::atomic::Ordering;
    let init = RegionInit {
        generation: 77,
        sample_period_ns: 1_000_000,
        clock_id: CLOCK_MONOTONIC,
    };
    let words = |m: &[std::sync::atomic::AtomicU64]| -> Vec<u64> {
        m.iter().map(|w| w.load(Ordering::Relaxed)).collect()
    };
    let dirty = |m: &[std::sync::atomic::AtomicU64]| {
        for (i, w) in m.iter().enumerate() {
            w.store(0x5a5a_5a5a_0000_0000 | i as u64, Ordering::Relaxed);
        }
    };
    // Guest: a full format of dirty memory and a zeroed format of fresh memory agree byte for
    // byte, and the result validates.
    let g = GuestRegionLayout::new(3, 40, 300).unwrap();
    let (full, fresh) = (memory(g.size), memory(g.size));
    dirty(&full);
    GuestRegion::format(RegionMut::from_atomic_words(&full), &g, &init).unwrap();
    GuestRegion::format_zeroed(RegionMut::from_atomic_words(&fresh), &g, &init).unwrap();
    // Up to the end of the ring: the page-rounding tail after it is no part of any table.
    let end = g.ring.slots.end() / 8;
    assert_eq!(words(&full)[..end], words(&fresh)[..end]);
    validate_guest_region(RegionMut::from_atomic_words(&fresh).as_region()).unwrap();
    // Host: the same.
    let h = HostRegionLayout::new(2, 500).unwrap();
    let (full, fresh) = (memory(h.size), memory(h.size));
    dirty(&full);
    HostRegion::format(RegionMut::from_atomic_words(&full), &h, &init).unwrap();
    HostRegion::format_zeroed(RegionMut::from_atomic_words(&fresh), &h, &init).unwrap();
    let end = h.ring.slots.end() / 8;
    assert_eq!(words(&full)[..end], words(&fresh)[..end]);
    validate_host_region(RegionMut::from_atomic_words(&fresh).as_region()).unwrap();
}
