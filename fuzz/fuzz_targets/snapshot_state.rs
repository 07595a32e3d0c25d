//! `vmm --restore`'s state-file parser: `snapshot::state::parse` on arbitrary bytes, with the
//! checksum line the bytes really have (so the parser itself is reached) and, from the first
//! input byte, sometimes a wrong one.
//!
//! Checked: it never panics; a wrong checksum is always refused; whatever it accepts has the
//! format and a version this VMM reads, as many vCPU states as vCPUs, a memory size that is a
//! whole number of pages, and a guest configuration that `config_of` either builds or refuses
//! with an error (never a panic).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::restore::config_of;
use vmm::snapshot::state::{checksum_line, parse, FORMAT, OLDEST_VERSION, VERSION};

fuzz_target!(|data: &[u8]| {
    let (flip, bytes) = match data.split_first() {
        Some((&f, rest)) => (f == 0xff, rest),
        None => (false, data),
    };
    if flip {
        assert!(parse(bytes, "crc32 state.json 0000000g").is_err());
        return;
    }
    let Ok(state) = parse(bytes, &checksum_line(bytes)) else {
        return;
    };
    assert_eq!(state.format, FORMAT);
    assert!((OLDEST_VERSION..=VERSION).contains(&state.version));
    assert_eq!(state.vcpus.len(), state.vm.vcpus);
    assert_eq!(state.vm.mem_bytes % 4096, 0);
    let _ = config_of(&state, std::path::Path::new("/nonexistent"));
});
