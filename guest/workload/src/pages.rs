//! Guest minor faults of the OS-less guest, counted in software.
//!
//! A Linux guest counts a minor fault when a task first touches a page of anonymous memory (the
//! demand-zero fault its kernel takes). The OS-less guest has no kernel and takes no fault of its
//! own, so it keeps one bit per 4 KiB page of each task's region and counts the first touch of
//! every page: the same events, counted instead of trapped. There is no backing store, so there
//! are no major faults.

use crate::AccessStream;

/// Bytes in one guest page, the unit of a guest minor fault.
pub const PAGE_BYTES: u64 = 4096;
const PAGE_SHIFT: u32 = PAGE_BYTES.trailing_zeros();

/// A bitmap too small for the region it should track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapTooSmall {
    /// Bytes the region needs ([`PageTracker::bitmap_bytes`]).
    pub needed: u64,
    /// Bytes given.
    pub given: u64,
}

/// One bit per page of a region of `len` bytes: which pages the task has touched, and how many.
#[derive(Debug)]
pub struct PageTracker<'a> {
    bits: &'a mut [u8],
    len: u64,
    touched: u64,
}

impl<'a> PageTracker<'a> {
    /// Bytes of bitmap a region of `len` bytes needs (one bit per page, a partial last page
    /// included).
    pub const fn bitmap_bytes(len: u64) -> u64 {
        len.div_ceil(PAGE_BYTES).div_ceil(8)
    }

    /// A tracker of a region of `len` bytes over `bits`, with no page touched yet (the bitmap's
    /// first [`Self::bitmap_bytes`]`(len)` bytes are cleared; the rest is left alone).
    pub fn new(bits: &'a mut [u8], len: u64) -> Result<Self, BitmapTooSmall> {
        let needed = Self::bitmap_bytes(len);
        let given = bits.len() as u64;
        let used = usize::try_from(needed)
            .ok()
            .and_then(|n| bits.get_mut(..n))
            .ok_or(BitmapTooSmall { needed, given })?;
        used.fill(0);
        Ok(Self {
            bits,
            len,
            touched: 0,
        })
    }

    /// Pages of the region (a partial last page counts).
    pub fn pages(&self) -> u64 {
        self.len.div_ceil(PAGE_BYTES)
    }

    /// Records an access at byte `offset` of the region; true if it is the first touch of its
    /// page (a guest minor fault). Offsets outside the region are ignored.
    #[inline]
    pub fn touch(&mut self, offset: u64) -> bool {
        if offset >= self.len {
            return false;
        }
        let page = offset >> PAGE_SHIFT;
        // In bounds by construction (`new` checked the bitmap's size); `get_mut` keeps it so.
        let Some(byte) = self.bits.get_mut((page >> 3) as usize) else {
            return false;
        };
        let mask = 1u8 << (page & 7);
        if *byte & mask != 0 {
            return false;
        }
        *byte |= mask;
        self.touched += 1;
        true
    }

    /// Whether the page holding byte `offset` has been touched.
    pub fn is_touched(&self, offset: u64) -> bool {
        if offset >= self.len {
            return false;
        }
        let page = offset >> PAGE_SHIFT;
        self.bits
            .get((page >> 3) as usize)
            .is_some_and(|b| b & (1 << (page & 7)) != 0)
    }

    /// Pages touched so far: the task's guest minor faults.
    pub fn touched(&self) -> u64 {
        self.touched
    }
}

/// [`crate::run_iteration`] that also records every access in `tracker` (a bit test per access),
/// so `tracker.touched()` counts the task's guest minor faults. Returns the same checksum.
///
/// # Safety
/// As [`crate::run_iteration`]: `region` must be valid for reads and writes of `len` bytes for the
/// whole call, and no other reference may alias it (nor the tracker's bitmap).
pub unsafe fn run_iteration_tracked(
    region: *mut u8,
    len: u64,
    stream: &mut AccessStream,
    accesses: u64,
    tracker: &mut PageTracker<'_>,
) -> u64 {
    // The page is "faulted in" before the access, as a kernel would.
    // SAFETY: the caller's guarantees are run_iteration_with's.
    unsafe {
        crate::run_iteration_with(region, len, stream, accesses, |offset| {
            tracker.touch(offset);
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{run_iteration, Pattern};
    use std::collections::BTreeSet;
    use std::vec;

    #[test]
    fn bitmap_sizes_round_up() {
        assert_eq!(PageTracker::bitmap_bytes(0), 0);
        assert_eq!(PageTracker::bitmap_bytes(1), 1);
        assert_eq!(PageTracker::bitmap_bytes(8 * PAGE_BYTES), 1);
        assert_eq!(PageTracker::bitmap_bytes(8 * PAGE_BYTES + 1), 2);
        assert_eq!(PageTracker::bitmap_bytes(16 << 20), 512);
        assert_eq!(PageTracker::bitmap_bytes(u64::MAX), 1 << 49);
    }

    #[test]
    fn first_touch_of_a_page_counts_once() {
        let mut bits = [0xffu8; 4];
        let mut t = PageTracker::new(&mut bits, 32 * PAGE_BYTES).expect("tracker");
        assert_eq!(
            (t.pages(), t.touched()),
            (32, 0),
            "a new tracker starts clean"
        );
        assert!(t.touch(100));
        assert!(!t.touch(100));
        assert!(!t.touch(0), "same page");
        assert!(!t.touch(PAGE_BYTES - 1), "same page");
        assert!(t.touch(PAGE_BYTES), "next page");
        assert!(t.is_touched(PAGE_BYTES + 5) && !t.is_touched(2 * PAGE_BYTES));
        assert_eq!(t.touched(), 2);
    }

    #[test]
    fn pages_at_the_region_edges() {
        let len = 17 * PAGE_BYTES;
        let mut bits = vec![0u8; usize::try_from(PageTracker::bitmap_bytes(len)).expect("fits")];
        let mut t = PageTracker::new(&mut bits, len).expect("tracker");
        assert!(t.touch(0));
        assert!(t.touch(len - 1), "last byte: page 16, bit 0 of byte 2");
        assert!(!t.touch(len), "one past the end is ignored");
        assert!(!t.touch(u64::MAX));
        assert!(!t.is_touched(len));
        assert_eq!(t.touched(), 2);
        assert_eq!(bits, [1, 0, 1]);
    }

    #[test]
    fn partial_last_page_is_a_page() {
        let len = 3 * PAGE_BYTES + 10;
        let mut bits = [0u8; 1];
        let mut t = PageTracker::new(&mut bits, len).expect("tracker");
        assert_eq!(t.pages(), 4);
        for offset in 0..len {
            t.touch(offset);
        }
        assert_eq!(t.touched(), 4);
        assert!(!t.touch(len));
    }

    #[test]
    fn too_small_a_bitmap_is_rejected() {
        let mut bits = [0u8; 1];
        assert_eq!(
            PageTracker::new(&mut bits, 8 * PAGE_BYTES + 1).err(),
            Some(BitmapTooSmall {
                needed: 2,
                given: 1
            })
        );
        assert!(PageTracker::new(&mut [], 1).is_err());
        assert!(PageTracker::new(&mut [], u64::MAX).is_err());
        let mut t = PageTracker::new(&mut [], 0).expect("an empty region needs no bitmap");
        assert!(!t.touch(0));
        // A larger bitmap is fine, and only its used part is cleared.
        let mut bits = [0xffu8; 3];
        let t = PageTracker::new(&mut bits, 9 * PAGE_BYTES).expect("tracker");
        assert_eq!(t.touched(), 0);
        assert_eq!(bits, [0, 0, 0xff]);
    }

    #[test]
    fn tracked_iteration_counts_the_distinct_pages_of_the_stream() {
        for (pattern, len, accesses) in [
            (Pattern::Random, 64 * PAGE_BYTES + 123, 30),
            (Pattern::Locality, 256 * PAGE_BYTES, 2_000),
        ] {
            let mut a = vec![0u8; usize::try_from(len).expect("fits")];
            let mut b = vec![0u8; usize::try_from(len).expect("fits")];
            let mut bits =
                vec![0u8; usize::try_from(PageTracker::bitmap_bytes(len)).expect("fits")];
            let mut t = PageTracker::new(&mut bits, len).expect("tracker");
            let mut sa = AccessStream::new(pattern, len, 5);
            let mut sb = AccessStream::new(pattern, len, 5);
            let mut expected = AccessStream::new(pattern, len, 5);
            let mut pages = BTreeSet::new();
            for _ in 0..3 * accesses {
                pages.insert(expected.next_offset() / PAGE_BYTES);
            }
            let mut sums = (0, 0);
            for _ in 0..3 {
                // SAFETY: the vectors are valid for `len` bytes and not aliased.
                unsafe {
                    sums.0 += run_iteration_tracked(a.as_mut_ptr(), len, &mut sa, accesses, &mut t);
                    sums.1 += run_iteration(b.as_mut_ptr(), len, &mut sb, accesses);
                }
            }
            assert_eq!(sums.0, sums.1, "same checksum as the untracked loop");
            assert_eq!(a, b, "same accesses");
            assert_eq!(t.touched(), pages.len() as u64, "{pattern:?}");
            assert!(t.touched() > 1 && t.touched() < t.pages(), "{pattern:?}");
        }
    }
}
