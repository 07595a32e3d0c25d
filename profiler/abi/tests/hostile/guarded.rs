//! Test memory for hostile regions: `len` bytes whose end is followed directly by an
//! inaccessible page, so any access past a region's end faults (under Miri, plain heap memory).

use std::sync::atomic::AtomicU64;

#[cfg(miri)]
use super::common::memory;
use mirrorball_profiler_abi::{Region, RegionMut};

#[cfg(not(miri))]
use super::PAGE;

#[cfg(not(miri))]
mod sys {
    use std::ffi::c_void;
    pub const PROT_NONE: i32 = 0;
    pub const PROT_READ: i32 = 1;
    pub const PROT_WRITE: i32 = 2;
    pub const MAP_PRIVATE: i32 = 0x02;
    pub const MAP_ANONYMOUS: i32 = 0x20;
    extern "C" {
        pub fn mmap(
            addr: *mut c_void,
            len: usize,
            prot: i32,
            flags: i32,
            fd: i32,
            off: i64,
        ) -> *mut c_void;
        pub fn mprotect(addr: *mut c_void, len: usize, prot: i32) -> i32;
        pub fn munmap(addr: *mut c_void, len: usize) -> i32;
    }
}

/// `len` bytes of zeroed memory followed directly by an inaccessible page.
#[cfg(not(miri))]
pub struct Guarded {
    map: *mut u8,
    map_len: usize,
    base: *mut u8,
    pub len: usize,
}

#[cfg(not(miri))]
impl Guarded {
    pub fn new(len: usize) -> Self {
        assert_eq!(len % 8, 0);
        let pages = len.div_ceil(PAGE);
        let map_len = (pages + 2) * PAGE;
        // SAFETY: plain anonymous mapping; checked below.
        let map = unsafe {
            sys::mmap(
                std::ptr::null_mut(),
                map_len,
                sys::PROT_READ | sys::PROT_WRITE,
                sys::MAP_PRIVATE | sys::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(!map.is_null() && map as isize != -1, "mmap failed");
        let map = map.cast::<u8>();
        // SAFETY: both guard pages lie inside the mapping.
        unsafe {
            assert_eq!(sys::mprotect(map.cast(), PAGE, sys::PROT_NONE), 0);
            assert_eq!(
                sys::mprotect(map.add((pages + 1) * PAGE).cast(), PAGE, sys::PROT_NONE),
                0
            );
        }
        // SAFETY: `base .. base + len` ends at the upper guard page and starts after the lower one.
        let base = unsafe { map.add((pages + 1) * PAGE - len) };
        Self {
            map,
            map_len,
            base,
            len,
        }
    }
}

#[cfg(not(miri))]
impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { sys::munmap(self.map.cast(), self.map_len) };
    }
}

/// Under Miri, plain heap memory: Miri itself reports any access outside it.
#[cfg(miri)]
pub struct Guarded {
    _words: Vec<AtomicU64>,
    base: *mut u8,
    pub len: usize,
}

#[cfg(miri)]
impl Guarded {
    pub fn new(len: usize) -> Self {
        let words = memory(len);
        let base = words.as_ptr().cast::<u8>().cast_mut();
        Self {
            _words: words,
            base,
            len,
        }
    }
}

impl Guarded {
    /// The memory as words (the tests poke bytes through these).
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: `base` is 8-aligned (page-aligned end minus a multiple of 8), `len` bytes are
        // mapped read-write for the life of `self`, and are only accessed atomically.
        unsafe { std::slice::from_raw_parts(self.base.cast::<AtomicU64>(), self.len / 8) }
    }

    pub fn region(&self) -> Region<'_> {
        // SAFETY: as above.
        unsafe { Region::from_raw(self.base, self.len).unwrap() }
    }

    pub fn region_mut(&self) -> RegionMut<'_> {
        // SAFETY: as above.
        unsafe { RegionMut::from_raw(self.base, self.len).unwrap() }
    }

    pub fn copy_from(&self, src: &[AtomicU64]) {
        for (d, s) in self.words().iter().zip(src) {
            d.store(
                s.load(std::sync::atomic::Ordering::Relaxed),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}
