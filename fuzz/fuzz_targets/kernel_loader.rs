//! The user-supplied kernel file: arbitrary bytes (random, ELF-looking, bzImage-looking) given to
//! `vmm::loader::load_kernel` with 32 MiB of guest RAM. It must return an error for anything it
//! cannot boot, never panic.
//!
//! The input is the whole kernel file. It is handed over as `/proc/self/fd/N` of a memfd, so the
//! real path-based code runs and nothing is written to disk.
//!
//! Checked when a kernel is accepted: it ends inside guest RAM. (Its entry point is not checked:
//! the loader takes an ELF's `e_entry` as given, even outside RAM; such a guest faults on its
//! first instruction, which the VMM reports as the guest's failure, see README.md.)
#![no_main]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mirrorball_fuzz::memfd_with;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::loader::load_kernel;

const RAM: u64 = 32 << 20;
static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let file = memfd_with(data);
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    // One guest RAM for the whole run: loading only writes to it, and what an earlier input left
    // there does not change how the next file is parsed. (A fresh 32 MiB mapping per input ran
    // at about half the speed.)
    let mem = MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory")
    });
    if let Ok(kernel) = load_kernel(mem, RAM, &path) {
        assert!(kernel.end <= RAM, "kernel ends at {:#x}", kernel.end);
    }
    drop(file);
});
