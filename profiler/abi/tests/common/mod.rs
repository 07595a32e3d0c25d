//! Helpers shared by the integration tests: backing memory, byte pokes, a seeded RNG.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use mirrorball_profiler_abi::*;

/// Zeroed, 8-aligned backing memory of `bytes` bytes (rounded up to words).
pub fn memory(bytes: usize) -> Vec<AtomicU64> {
    (0..bytes.div_ceil(8)).map(|_| AtomicU64::new(0)).collect()
}

/// Reads `len` (1..=8) little-endian bytes at byte offset `at`.
pub fn peek(mem: &[AtomicU64], at: usize, len: usize) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&mem[at / 8].load(Ordering::Relaxed).to_le_bytes());
    if at % 8 + len > 8 {
        bytes[8..].copy_from_slice(&mem[at / 8 + 1].load(Ordering::Relaxed).to_le_bytes());
    }
    let mut out = [0u8; 8];
    out[..len].copy_from_slice(&bytes[at % 8..at % 8 + len]);
    u64::from_le_bytes(out)
}

/// Writes the low `len` (1..=8) bytes of `value`, little-endian, at byte offset `at`.
pub fn poke(mem: &[AtomicU64], at: usize, len: usize, value: u64) {
    for (i, byte) in value.to_le_bytes()[..len].iter().enumerate() {
        let pos = at + i;
        let word = &mem[pos / 8];
        let shift = (pos % 8) * 8;
        let old = word.load(Ordering::Relaxed);
        word.store(
            (old & !(0xff << shift)) | (u64::from(*byte) << shift),
            Ordering::Relaxed,
        );
    }
}

/// Byte offset and size of `field` in the structure described by `desc`.
pub fn field(desc: &desc::StructDesc, field: &str) -> (usize, usize) {
    let f = desc
        .fields
        .iter()
        .find(|f| f.name == field)
        .unwrap_or_else(|| panic!("{} has no field {field}", desc.rust_name));
    (f.offset, f.size)
}

/// SplitMix64: small, seeded, good enough for test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A guest sample whose every field is derived from `seq`, so a reader can check that a record's
/// payload belongs to its sequence number.
pub fn guest_sample_for(seq: u64) -> GuestSample {
    GuestSample {
        timestamp_ns: seq.wrapping_mul(1_000_003),
        task_id: (seq & 0xffff_ffff) as u32,
        pid: (seq >> 32) as u32 ^ 0x5a5a,
        min_flt: seq,
        maj_flt: !seq,
        utime_ns: seq.rotate_left(17),
        stime_ns: seq ^ 0xdead_beef_cafe_f00d,
        cpu: (seq % 7) as u32,
        flags: (seq % 2) as u32,
    }
}

/// A host sample whose every field is derived from `seq`.
pub fn host_sample_for(seq: u64) -> HostSample {
    HostSample {
        timestamp_ns: seq.wrapping_mul(999_983),
        task_id: (seq & 0xffff_ffff) as u32,
        pid: (seq >> 32) as u32,
        vcpu: (seq % 4) as u32,
        attr_flags: (seq % 8) as u32,
        interval_ns: seq ^ 1,
        pf_taken: seq.wrapping_add(1),
        pf_fixed: seq.wrapping_add(2),
        exits: seq.wrapping_add(3),
        host_min_flt: seq.wrapping_add(4),
        host_maj_flt: seq.wrapping_add(5),
        vcpu_utime_ns: seq.wrapping_add(6),
        vcpu_stime_ns: seq.wrapping_add(7),
        guest_switch_count: !seq,
        slot_flags: (seq % 3) as u32,
        switches: ((seq >> 3) & 0xffff_ffff) as u32,
        cow_breaks: seq.wrapping_add(8),
        vcpu_wait_ns: seq.wrapping_add(9),
    }
}

/// Formats a guest region in fresh memory.
pub fn guest_memory(vcpus: u32, tasks: u32, ring: u32) -> (Vec<AtomicU64>, GuestRegionLayout) {
    let layout = GuestRegionLayout::new(vcpus, tasks, ring).unwrap();
    let mem = memory(layout.size);
    let init = RegionInit {
        generation: 0x1234_5678,
        sample_period_ns: 50_000_000,
        clock_id: CLOCK_MONOTONIC,
    };
    GuestRegion::format(RegionMut::from_atomic_words(&mem), &layout, &init).unwrap();
    (mem, layout)
}

/// Formats a host region in fresh memory.
pub fn host_memory(vcpus: u32, ring: u32) -> (Vec<AtomicU64>, HostRegionLayout) {
    let layout = HostRegionLayout::new(vcpus, ring).unwrap();
    let mem = memory(layout.size);
    let init = RegionInit {
        generation: 0xabcd,
        sample_period_ns: 1_000_000,
        clock_id: CLOCK_MONOTONIC,
    };
    HostRegion::format(RegionMut::from_atomic_words(&mem), &layout, &init).unwrap();
    (mem, layout)
}
