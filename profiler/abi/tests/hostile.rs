//! Regions written by a hostile party: every header field corrupted, random bytes, random
//! mutations of valid regions. Validation must answer with an error or a view whose every read
//! stays inside the mapping and returns — never a panic, an out-of-bounds access or a hang.
//!
//! The region under test ends exactly at a `PROT_NONE` guard page, so any read or write past its
//! end faults and fails the test (the crate itself has no way to see the guard).

mod common;

use common::*;
use mirrorball_profiler_abi::desc::StructDesc;
use mirrorball_profiler_abi::*;

#[cfg(not(miri))]
const PAGE: usize = 4096;

/// Random cases per test (Miri, which checks every access precisely, gets fewer).
const CASES: u64 = if cfg!(miri) { 100 } else { 10_000 };

#[path = "hostile/guarded.rs"]
mod guarded;
use guarded::Guarded;

/// Every scalar field of a header, flattened: (name, byte offset, size).
fn scalar_fields(desc: &StructDesc) -> Vec<(String, usize, usize)> {
    fn nested(name: &str) -> Option<&'static StructDesc> {
        match name {
            "common" => Some(&CommonHeader::DESC),
            "vcpus" | "tasks" => Some(&TableDesc::DESC),
            "ring" => Some(&RingDesc::DESC),
            _ => None,
        }
    }
    let mut out = Vec::new();
    for f in desc.fields {
        if let Some(inner) = nested(f.name) {
            for (n, o, s) in scalar_fields(inner) {
                out.push((format!("{}.{n}", f.name), f.offset + o, s));
            }
        } else if f.size > 8 {
            for i in 0..f.size / 8 {
                out.push((format!("{}[{i}]", f.name), f.offset + i * 8, 8));
            }
        } else {
            out.push((f.name.to_string(), f.offset, f.size));
        }
    }
    out
}

/// Uses a validated view the way a monitor would, plus everything a writer could do with it,
/// and checks that the validated layout lies inside the mapping.
fn exercise_guest(mem: &Guarded, rng: &mut Rng) {
    let Ok(view) = validate_guest_region(mem.region()) else {
        return;
    };
    let l = *view.layout();
    let len = mem.len;
    assert!(l.size <= len && l.header_size <= l.size);
    assert!(l.vcpus.end() <= l.size && l.tasks.end() <= l.size && l.ring.slots.end() <= l.size);
    assert!(l.ring.ctl_offset + 64 <= l.size);
    for i in 0..=view.vcpu_count().min(64) {
        let _ = view.vcpu(i);
    }
    let _ = view.vcpu(u32::MAX);
    for (_, t) in view.tasks().take(64) {
        let _ = t;
    }
    let _ = view.task(u32::MAX);
    let _ = (
        view.sample_period_ns(),
        view.guest_boot_id(),
        view.revalidate(),
    );
    exercise_ring(view.ring(), rng);

    // Writers on the same memory must stay inside it too.
    let region =
        GuestRegion::attach(mem.region_mut()).expect("valid for a reader, valid for a writer");
    if let Ok(mut w) = region.ring_writer() {
        for i in 0..3 {
            w.push(&guest_sample_for(i + 1));
        }
    }
    if let Ok(mut v) =
        region.vcpu_writer(u32::try_from(rng.below(u64::from(view.vcpu_count()))).expect("fits"))
    {
        v.switch_to(&CurrentTask::default(), 1);
    }
    let mut t = region.task_table();
    if let Ok(id) = t.register(
        (rng.next_u64() & 0xffff_ffff) as u32,
        0,
        &comm_from(b"x"),
        1,
    ) {
        t.unregister(id, 2).unwrap();
    }
}

fn exercise_ring<R: SampleRecord>(ring: RingView<'_, R>, rng: &mut Rng) {
    let head = ring.head();
    for seq in [
        0,
        1,
        head,
        head.wrapping_sub(1),
        u64::MAX,
        SEQ_WRITING,
        rng.next_u64(),
    ] {
        let _ = ring.read(seq);
    }
    let mut r = ring.reader();
    // A hostile ring can claim anything; a bounded number of polls is all a monitor spends.
    for _ in 0..u64::from(ring.capacity()).min(256) * 2 + 4 {
        if r.poll() == Poll::Empty {
            break;
        }
    }
    let mut r = RingReader::starting_at(ring, rng.next_u64());
    for _ in 0..4 {
        let _ = r.poll();
    }
}

fn exercise_host(mem: &Guarded, rng: &mut Rng) {
    let Ok(view) = validate_host_region(mem.region()) else {
        return;
    };
    let l = *view.layout();
    assert!(l.size <= mem.len && l.ring.slots.end() <= l.size && l.ring.ctl_offset + 64 <= l.size);
    let _ = (
        view.sample_period_ns(),
        view.revalidate(),
        view.vcpu_count(),
        view.mem_sharing(),
    );
    exercise_ring(view.ring(), rng);
    let region =
        HostRegion::attach(mem.region_mut()).expect("valid for a reader, valid for a writer");
    if let Ok(mut w) = region.ring_writer() {
        w.push(&host_sample_for(1));
    }
}

/// Values worth trying in a field, given the region length.
fn nasty_values(len: usize, rng: &mut Rng) -> Vec<u64> {
    let len = len as u64;
    vec![
        0,
        1,
        7,
        8,
        63,
        64,
        255,
        256,
        257,
        4095,
        4096,
        len - 64,
        len - 8,
        len,
        len + 8,
        len + 4096,
        0x7fff_ffff,
        0x8000_0000,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        1 << 62,
        1 << 63,
        u64::MAX - 7,
        u64::MAX,
        rng.next_u64(),
    ]
}

#[test]
fn every_guest_header_field_corrupted() {
    let layout = GuestRegionLayout::new(3, 5, 16).unwrap();
    let pristine = memory(layout.size);
    GuestRegion::format(
        RegionMut::from_atomic_words(&pristine),
        &layout,
        &RegionInit::default(),
    )
    .unwrap();
    let mem = Guarded::new(layout.size);
    let mut rng = Rng(1);
    let (mut ok, mut err) = (0, 0);
    for (name, at, size) in scalar_fields(&GuestHeader::DESC) {
        let mut rejected = 0;
        for value in nasty_values(layout.size, &mut rng) {
            mem.copy_from(&pristine);
            poke(mem.words(), at, size, value);
            match validate_guest_region(mem.region()) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(!format!("{e}").is_empty());
                    rejected += 1;
                    err += 1;
                }
            }
            exercise_guest(&mem, &mut rng);
        }
        // Fields a reader does not depend on may hold anything; every other one is checked.
        let free = [
            "reserved",
            "flags",
            "generation",
            "sample_period_ns",
            "clock_id",
            "guest_boot_id",
            "version_minor",
        ];
        if !free.iter().any(|f| name.contains(f)) {
            assert!(rejected > 0, "no corruption of {name} was rejected");
        }
    }
    println!("guest header fields: {ok} corruptions accepted (harmless fields or values), {err} rejected");
}

#[test]
fn every_host_header_field_corrupted() {
    let layout = HostRegionLayout::new(2, 16).unwrap();
    let pristine = memory(layout.size);
    HostRegion::format(
        RegionMut::from_atomic_words(&pristine),
        &layout,
        &RegionInit::default(),
    )
    .unwrap();
    let mem = Guarded::new(layout.size);
    let mut rng = Rng(2);
    for (name, at, size) in scalar_fields(&HostHeader::DESC) {
        let mut rejected = 0;
        for value in nasty_values(layout.size, &mut rng) {
            mem.copy_from(&pristine);
            poke(mem.words(), at, size, value);
            rejected += u32::from(validate_host_region(mem.region()).is_err());
            exercise_host(&mem, &mut rng);
        }
        let free = [
            "reserved",
            "flags",
            "generation",
            "sample_period_ns",
            "clock_id",
            "version_minor",
            // The memory-sharing block is figures, not layout: any value is readable.
            "mem",
            // Run-state flags (minor 3): unknown bits are ignored.
            "vm_state",
        ];
        if !free.iter().any(|f| name.contains(f)) {
            assert!(rejected > 0, "no corruption of {name} was rejected");
        }
    }
}

#[test]
fn specific_corruptions_give_specific_errors() {
    let layout = GuestRegionLayout::new(2, 4, 8).unwrap();
    let pristine = memory(layout.size);
    GuestRegion::format(
        RegionMut::from_atomic_words(&pristine),
        &layout,
        &RegionInit::default(),
    )
    .unwrap();
    let mem = Guarded::new(layout.size);
    let g = &GuestHeader::DESC;
    let at = |path: &str| -> (usize, usize) {
        let (_, o, s) = scalar_fields(g)
            .into_iter()
            .find(|(n, _, _)| n == path)
            .unwrap();
        (o, s)
    };
    let check = |path: &str, value: u64, expected: AbiError| {
        mem.copy_from(&pristine);
        let (o, s) = at(path);
        poke(mem.words(), o, s, value);
        assert_eq!(
            validate_guest_region(mem.region()).unwrap_err(),
            expected,
            "{path} = {value:#x}"
        );
    };
    let size = layout.size as u64;
    check(
        "common.magic",
        0,
        AbiError::BadMagic {
            found: 0,
            expected: GUEST_MAGIC,
        },
    );
    check(
        "common.version_major",
        2,
        AbiError::UnsupportedVersion {
            major: 2,
            minor: ABI_VERSION_MINOR,
        },
    );
    check(
        "common.region_size",
        size + 4096,
        AbiError::BadRegionSize {
            header: size + 4096,
            mapping: size,
        },
    );
    check(
        "common.region_size",
        size - 8,
        AbiError::BadRegionSize {
            header: size - 8,
            mapping: size,
        },
    );
    check(
        "common.region_size",
        0,
        AbiError::BadRegionSize {
            header: 0,
            mapping: size,
        },
    );
    check("common.header_size", 128, AbiError::BadHeaderSize(128));
    check("common.header_size", 260, AbiError::BadHeaderSize(260));
    check(
        "common.header_size",
        u32::MAX as u64,
        AbiError::BadHeaderSize(u32::MAX),
    );
    check("common.vcpu_count", 0, AbiError::BadVcpuCount(0));
    check("common.vcpu_count", 3, AbiError::BadVcpuCount(2));
    check(
        "common.vcpu_count",
        100_000,
        AbiError::BadVcpuCount(100_000),
    );
    check("vcpus.capacity", 0, AbiError::ZeroCapacity(Part::Vcpus));
    check("tasks.capacity", 0, AbiError::ZeroCapacity(Part::Tasks));
    check("ring.capacity", 0, AbiError::ZeroCapacity(Part::RingSlots));
    check(
        "ring.capacity",
        u64::from(u32::MAX),
        AbiError::CapacityTooLarge {
            part: Part::RingSlots,
            capacity: u32::MAX.into(),
            max: MAX_RING_RECORDS.into(),
        },
    );
    check("tasks.capacity", 1000, AbiError::OutOfBounds(Part::Tasks));
    check(
        "tasks.stride",
        32,
        AbiError::BadStride {
            part: Part::Tasks,
            stride: 32,
        },
    );
    check(
        "tasks.stride",
        68,
        AbiError::BadStride {
            part: Part::Tasks,
            stride: 68,
        },
    );
    check(
        "ring.stride",
        1 << 20,
        AbiError::BadStride {
            part: Part::RingSlots,
            stride: 1 << 20,
        },
    );
    check(
        "vcpus.offset",
        3,
        AbiError::BadOffset {
            part: Part::Vcpus,
            offset: 3,
        },
    );
    check(
        "vcpus.offset",
        64,
        AbiError::BadOffset {
            part: Part::Vcpus,
            offset: 64,
        },
    );
    check(
        "tasks.offset",
        u64::MAX - 7,
        AbiError::Overflow(Part::Tasks),
    );
    check(
        "ring.slots_offset",
        size,
        AbiError::OutOfBounds(Part::RingSlots),
    );
    check(
        "ring.ctl_offset",
        size - 8,
        AbiError::OutOfBounds(Part::RingCtl),
    );
    check(
        "tasks.offset",
        layout.vcpus.offset as u64,
        AbiError::Overlap(Part::Vcpus, Part::Tasks),
    );
    check(
        "ring.ctl_offset",
        layout.ring.slots.offset as u64 + 64,
        AbiError::Overlap(Part::RingCtl, Part::RingSlots),
    );
    // Harmless: a newer minor version, reserved fields, live fields.
    mem.copy_from(&pristine);
    poke(mem.words(), at("common.version_minor").0, 2, 0xffff);
    poke(mem.words(), at("reserved[3]").0, 8, u64::MAX);
    poke(mem.words(), at("common.sample_period_ns").0, 8, u64::MAX);
    let view = validate_guest_region(mem.region()).unwrap();
    assert_eq!(view.info().version_minor, 0xffff);
    assert_eq!(view.sample_period_ns(), u64::MAX);
}

#[test]
fn hostile_contents_of_a_valid_header() {
    // Garbage everywhere but the header: slots, entries, records, ring head.
    let layout = GuestRegionLayout::new(4, 8, 32).unwrap();
    let mem = Guarded::new(layout.size);
    let mut rng = Rng(3);
    for case in 0..CASES / 20 {
        GuestRegion::format(mem.region_mut(), &layout, &RegionInit::default()).unwrap();
        let words = mem.words();
        for w in &words[layout.header_size / 8..] {
            if rng.chance(30) {
                w.store(rng.next_u64(), std::sync::atomic::Ordering::Relaxed);
            }
        }
        if case % 2 == 0 {
            // Heads near the wrap and with the writing bit.
            let head = [u64::MAX, SEQ_WRITING, SEQ_WRITING - 1, 0, 2][(case / 2 % 5) as usize];
            poke(words, layout.ring.ctl_offset, 8, head);
        }
        let view = validate_guest_region(mem.region()).unwrap();
        for i in 0..4 {
            let _ = view.vcpu(i);
            let _ = Attribution::from_slot(view.vcpu(i), Some(rng.next_u64()));
        }
        for (_, t) in view.tasks() {
            let _ = t.map(|t| comm_bytes(&t.comm).len());
        }
        exercise_guest(&mem, &mut rng);
    }
}

/// Random bytes, with the fields validation checks first made plausible often enough that the
/// later checks (and the post-validation paths) get exercised.
fn random_region(mem: &Guarded, rng: &mut Rng, host: bool) {
    let words = mem.words();
    for w in words {
        w.store(rng.next_u64(), std::sync::atomic::Ordering::Relaxed);
    }
    let len = mem.len as u64;
    let c = &CommonHeader::DESC;
    let f = |n| field(c, n).0;
    if rng.chance(90) {
        poke(
            words,
            f("magic"),
            4,
            u64::from(if host { HOST_MAGIC } else { GUEST_MAGIC }),
        );
    }
    if rng.chance(90) {
        poke(words, f("version_major"), 2, 1);
    }
    if rng.chance(85) {
        let size = if rng.chance(80) {
            len / 4096 * 4096
        } else {
            rng.below(len + 1)
        };
        poke(words, f("region_size"), 8, size);
    }
    if rng.chance(85) {
        poke(
            words,
            f("header_size"),
            4,
            if rng.chance(80) { 256 } else { rng.below(1024) },
        );
    }
    let vcpus = 1 + rng.below(4);
    if rng.chance(85) {
        poke(words, f("vcpu_count"), 4, vcpus);
    }
    // Table descriptors: small capacities, sane strides, 8-aligned offsets past the header.
    let mut next = 256u64;
    let mut table = |at: usize, min_stride: u64, cap: u64, rng: &mut Rng| {
        if rng.chance(85) {
            let stride = if rng.chance(80) {
                min_stride
            } else {
                min_stride + 8 * rng.below(4)
            };
            let offset = if rng.chance(80) {
                next
            } else {
                8 * rng.below(len / 8 + 1)
            };
            poke(words, at, 8, offset);
            poke(words, at + 8, 4, cap);
            poke(words, at + 12, 4, stride);
            next = offset + cap * stride;
        }
    };
    if host {
        let r = field(&HostHeader::DESC, "ring").0;
        if rng.chance(85) {
            poke(words, r, 8, next);
            next += 64;
        }
        let cap = 1 + rng.below(40);
        let stride = 128 + if rng.chance(80) { 0 } else { 8 * rng.below(3) };
        if rng.chance(85) {
            poke(words, r + 8, 8, next);
            poke(words, r + 16, 4, cap);
            poke(words, r + 20, 4, stride);
        }
    } else {
        let g = &GuestHeader::DESC;
        table(field(g, "vcpus").0, 64, vcpus, rng);
        let tasks = 1 + rng.below(12);
        table(field(g, "tasks").0, 64, tasks, rng);
        let r = field(g, "ring").0;
        if rng.chance(85) {
            poke(words, r, 8, next);
            next += 64;
        }
        let cap = 1 + rng.below(24);
        if rng.chance(85) {
            poke(words, r + 8, 8, next);
            poke(words, r + 16, 4, cap);
            poke(
                words,
                r + 20,
                4,
                if rng.chance(80) {
                    64
                } else {
                    8 * rng.below(20)
                },
            );
        }
    }
}

#[test]
fn ten_thousand_random_regions() {
    let mut rng = Rng(0x4d42_4752);
    let sizes = [256usize, 264, 1024, 4096, 4096 + 8, 8192, 3 * 4096];
    let regions: Vec<Guarded> = sizes.iter().map(|&s| Guarded::new(s)).collect();
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for case in 0..CASES {
        let mem = &regions[usize::try_from(rng.below(regions.len() as u64)).expect("fits")];
        let host = case % 2 == 1;
        random_region(mem, &mut rng, host);
        let outcome = if host {
            validate_host_region(mem.region()).map(|_| ())
        } else {
            validate_guest_region(mem.region()).map(|_| ())
        };
        let key = match outcome {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{e:?}")
                .split(['(', ' ', '{'])
                .next()
                .unwrap()
                .to_string(),
        };
        *outcomes.entry(key).or_default() += 1;
        if host {
            exercise_host(mem, &mut rng);
        } else {
            exercise_guest(mem, &mut rng);
        }
    }
    println!("outcomes of {CASES} random regions: {outcomes:?}");
    assert!(
        outcomes.get("ok").copied().unwrap_or(0) as u64 >= CASES / 100,
        "too few valid regions"
    );
    assert!(outcomes.len() >= 5, "too few distinct rejections");
}

#[test]
fn ten_thousand_mutations_of_valid_regions() {
    let mut rng = Rng(0x5eed);
    let guest = GuestRegionLayout::new(2, 6, 20).unwrap();
    let host = HostRegionLayout::new(2, 20).unwrap();
    let gp = memory(guest.size);
    GuestRegion::format(
        RegionMut::from_atomic_words(&gp),
        &guest,
        &RegionInit::default(),
    )
    .unwrap();
    let hp = memory(host.size);
    HostRegion::format(
        RegionMut::from_atomic_words(&hp),
        &host,
        &RegionInit::default(),
    )
    .unwrap();
    let gm = Guarded::new(guest.size);
    let hm = Guarded::new(host.size);
    let mut accepted = 0;
    for case in 0..CASES {
        let (mem, pristine) = if case % 2 == 0 {
            (&gm, &gp)
        } else {
            (&hm, &hp)
        };
        mem.copy_from(pristine);
        for _ in 0..1 + rng.below(6) {
            // Mostly the header, sometimes anywhere.
            let at = usize::try_from(if rng.chance(80) {
                rng.below(256)
            } else {
                rng.below(mem.len as u64)
            })
            .expect("fits");
            let len = 1 + usize::try_from(rng.below(8)).expect("fits");
            let at = at.min(mem.len - len);
            poke(mem.words(), at, len, rng.next_u64());
        }
        let ok = if case % 2 == 0 {
            let ok = validate_guest_region(mem.region()).is_ok();
            exercise_guest(mem, &mut rng);
            ok
        } else {
            let ok = validate_host_region(mem.region()).is_ok();
            exercise_host(mem, &mut rng);
            ok
        };
        accepted += u32::from(ok);
    }
    println!("mutations: {accepted} of {CASES} still valid (reserved, live or data fields)");
}

#[test]
fn memory_sharing_round_trips_and_is_none_before_the_first_scan() {
    use mirrorball_profiler_abi::MemSharingFigures;
    let layout = HostRegionLayout::new(1, 16).unwrap();
    let words = memory(layout.size);
    let region = HostRegion::format(
        RegionMut::from_atomic_words(&words),
        &layout,
        &RegionInit::default(),
    )
    .unwrap();
    assert_eq!(region.view().unwrap().mem_sharing(), None);
    let figures = MemSharingFigures {
        ram_pages: 65536,
        shared_pages: 1000,
        private_pages: 24,
        merged_pages: 3,
        cow_breaks: 24,
        cloned: true,
        scanned_ns: 42,
    };
    region.set_mem_sharing(&figures);
    assert_eq!(region.view().unwrap().mem_sharing(), Some(figures));
    let later = MemSharingFigures {
        private_pages: 30,
        cow_breaks: 30,
        ..figures
    };
    region.set_mem_sharing(&later);
    assert_eq!(region.view().unwrap().mem_sharing(), Some(later));
}
