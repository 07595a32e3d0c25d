//! Parser tests on crafted stats files (memfds): no KVM needed.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use super::*;

const NAME_SIZE: u32 = 48;

/// Cumulative count, nanoseconds (exponent -9), and log histogram flag words as KVM builds them.
const CUMULATIVE: u32 = KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_NONE | KVM_STATS_BASE_POW10;
const INSTANT: u32 = KVM_STATS_TYPE_INSTANT | KVM_STATS_UNIT_NONE | KVM_STATS_BASE_POW10;
const PEAK: u32 = KVM_STATS_TYPE_PEAK | KVM_STATS_UNIT_BYTES | KVM_STATS_BASE_POW2;
const LOG_HIST_NS: u32 = KVM_STATS_TYPE_LOG_HIST | KVM_STATS_UNIT_SECONDS | KVM_STATS_BASE_POW10;

struct D {
    flags: u32,
    exponent: i16,
    size: u16,
    offset: u32,
    name: &'static [u8],
}

fn d(flags: u32, size: u16, offset: u32, name: &'static str) -> D {
    D {
        flags,
        exponent: 0,
        size,
        offset,
        name: name.as_bytes(),
    }
}

/// The standard kernel layout: header, id, descriptors, data. Returns the bytes and the data
/// block's file offset.
fn build(name_size: u32, id: &str, descs: &[D], data: &[u64]) -> (Vec<u8>, u64) {
    let ns = name_size as usize;
    let id_offset = HEADER_SIZE;
    let desc_offset = id_offset + ns;
    let data_offset = desc_offset + descs.len() * (DESC_FIXED_SIZE + ns);
    let mut out = Vec::new();
    for v in [
        0,
        name_size,
        u32::try_from(descs.len()).expect("fits"),
        u32::try_from(id_offset).expect("fits"),
        u32::try_from(desc_offset).expect("fits"),
        u32::try_from(data_offset).expect("fits"),
    ] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    let padded = |s: &[u8], out: &mut Vec<u8>| {
        let mut field = vec![0u8; ns];
        let n = s.len().min(ns);
        field[..n].copy_from_slice(&s[..n]);
        out.extend_from_slice(&field);
    };
    padded(id.as_bytes(), &mut out);
    for desc in descs {
        out.extend_from_slice(&desc.flags.to_ne_bytes());
        out.extend_from_slice(&desc.exponent.to_ne_bytes());
        out.extend_from_slice(&desc.size.to_ne_bytes());
        out.extend_from_slice(&desc.offset.to_ne_bytes());
        out.extend_from_slice(&7u32.to_ne_bytes()); // bucket_size
        padded(desc.name, &mut out);
    }
    assert_eq!(out.len(), data_offset);
    for v in data {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    (out, data_offset as u64)
}

fn set_header(bytes: &mut [u8], field: usize, value: u32) {
    bytes[field * 4..field * 4 + 4].copy_from_slice(&value.to_ne_bytes());
}

fn memfile(bytes: &[u8]) -> File {
    // SAFETY: the name is a NUL-terminated C string literal and the flags are valid.
    let fd = unsafe { libc::memfd_create(c"kvm-stats-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes).unwrap();
    f
}

fn sample_descs() -> Vec<D> {
    vec![
        d(CUMULATIVE, 1, 0, "exits"),
        d(INSTANT, 1, 8, "pages_4k"),
        d(PEAK, 1, 16, "max_rmap"),
        D {
            exponent: -9,
            ..d(LOG_HIST_NS, 4, 24, "halt_wait_hist")
        },
        d(0xf | KVM_STATS_UNIT_CYCLES, 1, 56, "future_type"),
    ]
}

const SAMPLE_DATA: [u64; 8] = [100, 20, 30, 1, 2, 3, 4, 99];

fn sample_file() -> (File, u64) {
    let (bytes, data_offset) = build(NAME_SIZE, "kvm-1/vcpu-0", &sample_descs(), &SAMPLE_DATA);
    (memfile(&bytes), data_offset)
}

fn parse(bytes: &[u8]) -> Result<StatsFd, Error> {
    StatsFd::from_file(memfile(bytes))
}

#[test]
fn parses_descriptors_and_values() {
    let (file, _) = sample_file();
    let stats = StatsFd::from_file(file).unwrap();
    assert_eq!(stats.id(), "kvm-1/vcpu-0");
    assert_eq!(stats.data_words(), 8);
    let names: Vec<&str> = stats
        .descriptors()
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "exits",
            "pages_4k",
            "max_rmap",
            "halt_wait_hist",
            "future_type"
        ]
    );
    let hist = &stats.descriptors()[3];
    assert_eq!(hist.kind, StatKind::LogHist);
    assert_eq!(hist.unit, StatUnit::Seconds);
    assert_eq!(hist.base, StatBase::Pow10);
    assert_eq!(hist.exponent, -9);
    assert_eq!(hist.bucket_size, 7);
    assert_eq!(stats.descriptors()[2].kind, StatKind::Peak);
    assert_eq!(stats.descriptors()[2].unit, StatUnit::Bytes);
    assert_eq!(stats.descriptors()[2].base, StatBase::Pow2);
    assert_eq!(stats.descriptors()[4].kind, StatKind::Unknown(0xf));
    assert_eq!(stats.descriptors()[4].unit, StatUnit::Cycles);

    assert_eq!(stats.index_of("pages_4k"), Some(1));
    assert_eq!(stats.index_of("nope"), None);

    let s = stats.read().unwrap();
    assert_eq!(s.get(0), Some(100));
    assert_eq!(s.get(1), Some(20));
    assert_eq!(s.get(3), Some(1), "histogram get() is its first bucket");
    assert_eq!(s.get(5), None);
    assert_eq!(s.values(3), Some(&[1, 2, 3, 4][..]));
    assert_eq!(s.get_by_name("future_type"), Some(99));

    let map = s.to_map();
    let expected: BTreeMap<String, u64> = [
        ("exits", 100),
        ("pages_4k", 20),
        ("max_rmap", 30),
        ("future_type", 99),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(map, expected, "histograms are left out of to_map");
}

#[test]
fn every_read_rereads_the_file() {
    let (file, data_offset) = sample_file();
    let writer = file.try_clone().unwrap();
    let stats = StatsFd::from_file(file).unwrap();
    let mut buf = Vec::new();
    stats.read_into(&mut buf).unwrap();
    assert_eq!(buf, SAMPLE_DATA);
    let ptr = buf.as_ptr();

    writer.write_at(&555u64.to_ne_bytes(), data_offset).unwrap();
    stats.read_into(&mut buf).unwrap();
    assert_eq!(stats.descriptors()[0].first(&buf), Some(555));
    assert_eq!(buf.as_ptr(), ptr, "read_into reuses the buffer");
    assert_eq!(stats.read().unwrap().get(0), Some(555));
    assert_eq!(stats.descriptors()[3].values(&buf[..4]), None);
}

#[test]
fn delta_since_subtracts_only_cumulative_stats() {
    let (file, data_offset) = sample_file();
    let writer = file.try_clone().unwrap();
    let stats = StatsFd::from_file(file).unwrap();
    let before = stats.read().unwrap();
    // exits 100 -> 130, pages_4k 20 -> 5, max_rmap 30 -> 31.
    for (i, v) in [130u64, 5, 31].into_iter().enumerate() {
        writer
            .write_at(&v.to_ne_bytes(), data_offset + 8 * i as u64)
            .unwrap();
    }
    let after = stats.read().unwrap();
    let delta = after.delta_since(&before);
    assert_eq!(delta["exits"], 30);
    assert_eq!(
        delta["pages_4k"], 5,
        "instant stats report the current value"
    );
    assert_eq!(delta["max_rmap"], 31, "peak stats report the current value");
    assert!(!delta.contains_key("halt_wait_hist"));
    // A counter that went backwards (e.g. baseline from a later sample) saturates at 0.
    assert_eq!(before.delta_since(&after)["exits"], 0);
}

#[test]
fn delta_since_matches_other_layouts_by_name() {
    let (a, _) = build(NAME_SIZE, "a", &[d(CUMULATIVE, 1, 0, "exits")], &[10]);
    let (b, _) = build(
        NAME_SIZE,
        "b",
        &[
            d(CUMULATIVE, 1, 0, "pf_taken"),
            d(CUMULATIVE, 1, 8, "exits"),
        ],
        &[7, 25],
    );
    let base = parse(&a).unwrap().read().unwrap();
    let now = parse(&b).unwrap().read().unwrap();
    let delta = now.delta_since(&base);
    assert_eq!(delta["exits"], 15);
    assert_eq!(
        delta["pf_taken"], 7,
        "missing from the baseline counts from 0"
    );
}

#[test]
fn empty_descriptor_set_is_valid() {
    let (bytes, _) = build(NAME_SIZE, "kvm-2", &[], &[]);
    let stats = parse(&bytes).unwrap();
    assert!(stats.descriptors().is_empty());
    assert!(stats.read().unwrap().to_map().is_empty());
}

#[test]
fn truncated_header_is_an_error() {
    let (bytes, _) = build(NAME_SIZE, "x", &sample_descs(), &SAMPLE_DATA);
    for len in [0, 1, 10, HEADER_SIZE - 1] {
        match parse(&bytes[..len]) {
            Err(Error::Truncated { what: "header", .. }) => {}
            other => panic!("len {len}: expected truncated header, got {other:?}"),
        }
    }
}

#[test]
fn every_truncation_fails_cleanly() {
    let (bytes, _) = build(NAME_SIZE, "x", &sample_descs(), &SAMPLE_DATA);
    for len in 0..bytes.len() {
        assert!(
            parse(&bytes[..len]).is_err(),
            "accepted {len} of {} bytes",
            bytes.len()
        );
    }
    assert!(parse(&bytes).is_ok());
}

#[test]
fn huge_num_desc_is_rejected_before_allocating() {
    let (mut bytes, _) = build(NAME_SIZE, "x", &sample_descs(), &SAMPLE_DATA);
    set_header(&mut bytes, 2, u32::MAX);
    match parse(&bytes) {
        Err(Error::HeaderOutOfRange {
            field: "num_desc",
            value,
            ..
        }) => assert_eq!(value, u64::from(u32::MAX)),
        other => panic!("expected num_desc out of range, got {other:?}"),
    }
    // At the limit it is accepted as a count but the file has no room for the descriptors.
    set_header(&mut bytes, 2, MAX_DESCRIPTORS);
    assert!(matches!(
        parse(&bytes),
        Err(Error::Truncated {
            what: "descriptors",
            ..
        })
    ));
}

#[test]
fn huge_or_zero_name_size_is_rejected() {
    let (mut bytes, _) = build(NAME_SIZE, "x", &sample_descs(), &SAMPLE_DATA);
    for bad in [u32::MAX, MAX_NAME_SIZE + 1, 0] {
        set_header(&mut bytes, 1, bad);
        match parse(&bytes) {
            Err(Error::HeaderOutOfRange {
                field: "name_size",
                value,
                ..
            }) => assert_eq!(value, u64::from(bad)),
            other => panic!("name_size {bad}: got {other:?}"),
        }
    }
}

#[test]
fn bad_id_offset_is_an_error() {
    let (mut bytes, _) = build(NAME_SIZE, "x", &sample_descs(), &SAMPLE_DATA);
    set_header(&mut bytes, 3, 1_000_000);
    assert!(matches!(
        parse(&bytes),
        Err(Error::Truncated {
            what: "id string",
            offset: 1_000_000,
            ..
        })
    ));
    set_header(&mut bytes, 3, u32::MAX);
    assert!(matches!(parse(&bytes), Err(Error::Truncated { .. })));
    set_header(&mut bytes, 3, 4);
    assert!(matches!(
        parse(&bytes),
        Err(Error::HeaderOutOfRange {
            field: "id_offset",
            ..
        })
    ));
}

#[test]
fn bad_desc_or_data_offset_is_an_error() {
    let (bytes, _) = build(NAME_SIZE, "x", &sample_descs(), &SAMPLE_DATA);
    let mut b = bytes.clone();
    set_header(&mut b, 4, u32::MAX);
    assert!(matches!(
        parse(&b),
        Err(Error::Truncated {
            what: "descriptors",
            ..
        })
    ));
    let mut b = bytes.clone();
    set_header(&mut b, 5, u32::MAX - 3);
    assert!(matches!(
        parse(&b),
        Err(Error::BadDescriptor { index: 0, .. })
    ));
    let mut b = bytes;
    set_header(&mut b, 5, 0);
    assert!(matches!(
        parse(&b),
        Err(Error::HeaderOutOfRange {
            field: "data_offset",
            ..
        })
    ));
}

fn expect_bad_desc(descs: &[D], data: &[u64], index: usize, reason: &str) {
    let (bytes, _) = build(NAME_SIZE, "x", descs, data);
    match parse(&bytes) {
        Err(Error::BadDescriptor {
            index: i,
            reason: r,
            ..
        }) => {
            assert_eq!((i, r), (index, reason));
        }
        other => panic!("expected bad descriptor {index} ({reason}), got {other:?}"),
    }
}

#[test]
fn descriptors_outside_the_data_block_are_rejected() {
    let past_end = "extends past the end of the data block";
    let ok = d(CUMULATIVE, 1, 0, "ok");
    // Offset past the two words of data that exist.
    expect_bad_desc(&[ok, d(CUMULATIVE, 1, 16, "far")], &[1, 2], 1, past_end);
    // Size reaching past the data.
    expect_bad_desc(&[d(LOG_HIST_NS, 3, 0, "hist")], &[1, 2], 0, past_end);
    // Maximal size at offset 0 (512 KiB) is under the cap but not present in the file.
    expect_bad_desc(&[d(LOG_HIST_NS, u16::MAX, 0, "big")], &[1], 0, past_end);
    // Offsets beyond the cap are rejected before anything is read or allocated.
    expect_bad_desc(
        &[d(CUMULATIVE, 1, u32::MAX - 7, "huge")],
        &[1],
        0,
        "extends past MAX_DATA_BYTES",
    );
    expect_bad_desc(
        &[d(CUMULATIVE, 1, 4, "odd")],
        &[1, 2],
        0,
        "offset is not 8-byte aligned",
    );
    expect_bad_desc(&[d(CUMULATIVE, 0, 0, "empty")], &[1], 0, "size is zero");
}

#[test]
fn odd_names_decode_without_panicking() {
    let long: &'static str = Box::leak("n".repeat(NAME_SIZE as usize).into_boxed_str());
    let descs = [
        D {
            name: b"caf\xc3\xa9\xff",
            ..d(CUMULATIVE, 1, 0, "")
        },
        d(CUMULATIVE, 1, 8, long),
    ];
    let (bytes, _) = build(NAME_SIZE, "x", &descs, &[1, 2]);
    let stats = parse(&bytes).unwrap();
    assert_eq!(stats.descriptors()[0].name, "caf\u{e9}\u{fffd}");
    assert_eq!(
        stats.descriptors()[1].name,
        long,
        "a name filling name_size has no NUL"
    );
}

#[test]
fn random_corruption_never_panics() {
    let (bytes, _) = build(NAME_SIZE, "kvm-9", &sample_descs(), &SAMPLE_DATA);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut accepted, mut rejected) = (0, 0);
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = usize::try_from(next() % b.len() as u64).expect("fits");
            b[at] = (next() & 0xff) as u8;
        }
        let cut = b.len() - (next() % 8) as usize * (next() % 2) as usize;
        match parse(&b[..cut]) {
            Ok(stats) => {
                accepted += 1;
                let s = stats.read().unwrap();
                let _ = s.to_map();
                for i in 0..stats.descriptors().len() {
                    assert!(s.values(i).is_some());
                }
            }
            Err(_) => rejected += 1,
        }
    }
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn a_word_range_read_fills_only_those_words() {
    let (file, data_offset) = sample_file();
    let writer = file.try_clone().unwrap();
    let stats = StatsFd::from_file(file).unwrap();
    let words = stats.descriptors()[1].word_range();
    let mut buf = Vec::new();
    stats.read_words_into(words.clone(), &mut buf).unwrap();
    assert_eq!(buf.len(), stats.data_words());
    assert_eq!(stats.descriptors()[1].first(&buf), Some(SAMPLE_DATA[1]));
    assert_eq!(buf[0], 0, "words outside the range are not read");

    writer
        .write_at(&7u64.to_ne_bytes(), data_offset + 8)
        .unwrap();
    writer.write_at(&9u64.to_ne_bytes(), data_offset).unwrap();
    stats.read_words_into(words, &mut buf).unwrap();
    assert_eq!(stats.descriptors()[1].first(&buf), Some(7));
    assert_eq!(buf[0], 0);
    let past = stats.data_words()..stats.data_words() + 1;
    assert!(stats.read_words_into(past, &mut buf).is_err());
}
