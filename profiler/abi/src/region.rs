//! Handles to shared memory: [`Region`] (read) and [`RegionMut`] (read and write).
//!
//! # Memory model
//!
//! A region is memory another party writes concurrently — and in the guest region's case a
//! hostile one. Creating a `&T` or `&[u8]` to such memory in Rust asserts that nobody changes it
//! while the reference lives, which the other party may violate at will: undefined behaviour. This
//! crate therefore:
//!
//! - never creates a reference to plain data in a region. A region is a raw base pointer and a
//!   length, and the only references ever made into it are to the `repr(C)` structures of
//!   [`crate::abi`], which consist solely of `core::sync::atomic` integers (each an `UnsafeCell`)
//!   with no padding — the same situation as sharing an `AtomicU64` between threads;
//! - makes those references through one bounds- and alignment-checked accessor, so no index
//!   computed from header values can leave the mapping;
//! - on the reading side uses only `Relaxed` loads of at most 8 bytes followed by explicit
//!   `fence(Acquire)` where ordering is needed. Rust documents relaxed loads of register width
//!   as sound on read-only memory, which is how host readers map the regions (`PROT_READ`);
//! - on the writing side uses `Relaxed` stores and `fence(Release)` / `Release` stores; a C
//!   writer uses `WRITE_ONCE` and `smp_wmb()` / `smp_store_release()`, which compile to the same
//!   instructions on x86-64.
//!
//! Every location is always accessed with the same width, so there are no mixed-size accesses.
//! Values read from a region are plain integers: garbage written by a hostile party can make them
//! meaningless, never make the reader unsound or make it index outside the mapping.

use core::marker::PhantomData;
use core::mem::{align_of, size_of, size_of_val};
use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;

use crate::desc::Shared;
use crate::error::AbiError;

/// Alignment a region's base address must have.
pub const REGION_ALIGN: usize = 8;

/// Shared memory to read: a base pointer and a length, valid for `'a`.
///
/// Readers only ever perform relaxed atomic loads through it, so it may describe a read-only
/// mapping.
#[derive(Clone, Copy, Debug)]
pub struct Region<'a> {
    base: NonNull<u8>,
    len: usize,
    _memory: PhantomData<&'a [AtomicU64]>,
}

// SAFETY: a `Region` only hands out references to atomics; sharing it across threads is the same
// as sharing `&[AtomicU64]`.
unsafe impl Send for Region<'_> {}
// SAFETY: as above.
unsafe impl Sync for Region<'_> {}

impl<'a> Region<'a> {
    /// A region over memory this process owns (tests, in-process producers and consumers).
    pub fn from_atomic_words(words: &'a [AtomicU64]) -> Self {
        Self {
            base: NonNull::from(words).cast(),
            len: size_of_val(words),
            _memory: PhantomData,
        }
    }

    /// A region over `len` bytes at `base`, e.g. an `mmap`ed memfd (it may be `PROT_READ`).
    ///
    /// Fails if `base` is null or not 8-byte aligned.
    ///
    /// # Safety
    /// For all of `'a`, the `len` bytes at `base` must stay mapped and readable. Other threads and
    /// processes may write them concurrently in any way; within this process they must be
    /// written only through atomics (this crate's writers do).
    pub unsafe fn from_raw(base: *const u8, len: usize) -> Result<Self, AbiError> {
        let base = NonNull::new(base as *mut u8).ok_or(AbiError::Misaligned)?;
        if base.as_ptr() as usize % REGION_ALIGN != 0 {
            return Err(AbiError::Misaligned);
        }
        Ok(Self {
            base,
            len,
            _memory: PhantomData,
        })
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address (for diagnostics).
    pub fn as_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    /// The shared structure at `offset`, if it lies wholly inside the region and is aligned.
    pub(crate) fn get<T: Shared>(&self, offset: usize) -> Option<&'a T> {
        let end = offset.checked_add(size_of::<T>())?;
        if end > self.len || offset % align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: `base` is valid for reads of `len` bytes for `'a` (constructor contract) and
        // `offset + size_of::<T>() <= len`; `base` is 8-aligned and `align_of::<T>() <= 8`
        // divides `offset`, so the pointer is aligned. `T: Shared` consists of atomics only, so
        // a shared reference stays sound while other parties write the memory.
        Some(unsafe { &*self.base.as_ptr().add(offset).cast::<T>() })
    }

    /// The `index`th entry of an array of `T` at `offset` with `stride` bytes between entries.
    pub(crate) fn entry<T: Shared>(
        &self,
        offset: usize,
        stride: usize,
        index: usize,
    ) -> Option<&'a T> {
        let at = stride.checked_mul(index)?.checked_add(offset)?;
        self.get(at)
    }
}

/// Shared memory to read and write: what the producers (the guest driver, the VMM's sampler) and
/// the formatter use.
#[derive(Debug)]
pub struct RegionMut<'a> {
    region: Region<'a>,
}

impl<'a> RegionMut<'a> {
    /// A writable region over memory this process owns.
    pub fn from_atomic_words(words: &'a [AtomicU64]) -> Self {
        Self {
            region: Region::from_atomic_words(words),
        }
    }

    /// A writable region over `len` bytes at `base`, e.g. a `PROT_READ | PROT_WRITE` mapping.
    ///
    /// # Safety
    /// For all of `'a`, the `len` bytes at `base` must stay mapped, readable and writable. Other
    /// threads and processes may access them concurrently; within this process they must be
    /// accessed only through this crate (or other atomics).
    pub unsafe fn from_raw(base: *mut u8, len: usize) -> Result<Self, AbiError> {
        Ok(Self {
            // SAFETY: forwarded contract (writable implies readable).
            region: unsafe { Region::from_raw(base, len)? },
        })
    }

    /// Writable again: only for regions that came from a `RegionMut`.
    pub(crate) fn from_region(region: Region<'a>) -> Self {
        Self { region }
    }

    /// The same memory, for reading.
    pub fn as_region(&self) -> Region<'a> {
        self.region
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.region.len
    }

    /// True if the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.region.len == 0
    }
}
