//! The KVM binary-stats file parser on arbitrary file contents: `StatsFd::from_file`, then, when
//! it accepts the file, `read()`, `to_map()`, `delta_since()` and per-descriptor lookups.
//!
//! The input is the whole file (header, id string, descriptors and data block at the offsets
//! the header names). The data comes from the kernel, but it is parsed from an fd: the parser
//! must return errors, never panic, and allocate only what its documented caps allow (run with
//! `-malloc_limit_mb`, see README.md).
//!
//! Checked when the file is accepted: sampling the same, unchanged file succeeds; the sample has
//! `data_words()` words; every descriptor's values lie inside it; `to_map` has exactly the
//! scalar (non-histogram) stats by name; a sample's delta against itself is zero for cumulative
//! stats.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorball_fuzz::memfd_with;
use mirrorball_profiler::kvm_stats::{StatKind, StatsFd, MAX_DATA_BYTES, MAX_DESCRIPTORS};

fuzz_target!(|data: &[u8]| {
    let Ok(stats) = StatsFd::from_file(memfd_with(data)) else {
        return;
    };
    let descs = stats.descriptors();
    assert!(descs.len() <= MAX_DESCRIPTORS as usize);
    assert!((stats.data_words() as u64) * 8 <= MAX_DATA_BYTES);
    let _ = stats.id();

    let sample = stats
        .read()
        .expect("re-reading an accepted, unchanged stats file");
    assert_eq!(sample.raw().len(), stats.data_words());
    let mut buf = Vec::new();
    stats.read_into(&mut buf).expect("read_into");
    assert_eq!(buf.as_slice(), sample.raw());

    for (i, d) in descs.iter().enumerate() {
        let values = sample
            .values(i)
            .expect("an accepted descriptor lies inside the data");
        assert_eq!(values.len(), usize::from(d.size));
        assert_eq!(sample.get(i), values.first().copied());
        assert_eq!(stats.index_of(&d.name).map(|j| j <= i), Some(true));
    }
    assert_eq!(sample.get(descs.len()), None);

    let map = sample.to_map();
    for (name, value) in &map {
        // Duplicate names: the map keeps the last scalar of that name.
        let last = descs
            .iter()
            .enumerate()
            .rfind(|(_, d)| &d.name == name && !d.kind.is_histogram())
            .map(|(i, _)| sample.get(i));
        assert_eq!(last, Some(Some(*value)), "{name}");
    }
    for d in descs.iter().filter(|d| !d.kind.is_histogram()) {
        assert!(
            map.contains_key(&d.name),
            "scalar {} missing from to_map",
            d.name
        );
    }

    let delta = sample.delta_since(&sample);
    for d in descs
        .iter()
        .filter(|d| d.kind == StatKind::Cumulative)
        .filter(|d| descs.iter().filter(|o| o.name == d.name).count() == 1)
    {
        assert_eq!(delta.get(&d.name), Some(&0), "{}", d.name);
    }
    // A second, independently parsed view of the same file (another layout) agrees too.
    let again = StatsFd::from_file(memfd_with(data)).expect("the same bytes parse twice");
    let other = again.read().expect("second read");
    assert_eq!(other.to_map(), map);
    let _ = sample.delta_since(&other);
});
