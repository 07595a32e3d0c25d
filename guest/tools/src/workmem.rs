//! The `work` program's memory: one private anonymous mapping, faulted in page by page by the
//! access pattern, and counted afterwards with `mincore(2)`.
//!
//! MP3's `work` `malloc`s its memory in 1 MiB blocks, which never get transparent huge pages, so
//! every 4 KiB page it touches costs one fault (two when the first access is a read: the zero
//! page, then copy-on-write). One big mapping would get THP on many kernels and hide most faults,
//! so [`WorkMemory`] asks for `MADV_NOHUGEPAGE` (best effort: kernels without THP refuse it).
//!
//! The access patterns themselves are the OS-less guest's, from the contract crate
//! (`mirrorball_workload::AccessStream` / `run_iteration`), so both guests run the same `work`.

use std::io;
use std::ptr::NonNull;

use mirrorball_workload::{run_iteration, AccessStream};

/// Bytes in one page (x86-64).
pub const PAGE_BYTES: usize = 4096;

/// A private anonymous read-write mapping, unmapped on drop. No page is resident until touched.
#[derive(Debug)]
pub struct WorkMemory {
    ptr: NonNull<u8>,
    len: usize,
}

impl WorkMemory {
    /// Maps `len` bytes (`len` > 0; rounded up to pages by the kernel).
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty work memory",
            ));
        }
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; the result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        // SAFETY: advice on exactly the mapping just created; failure (no THP support) is
        // harmless and ignored.
        unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_NOHUGEPAGE) };
        Ok(Self { ptr, len })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is mapped (never: [`WorkMemory::new`] refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages of the mapping.
    pub fn pages(&self) -> usize {
        self.len.div_ceil(PAGE_BYTES)
    }

    /// Runs one iteration of `work`: `accesses` single-byte read-modify-writes at offsets from
    /// `stream`. Returns the checksum of the bytes read.
    pub fn iterate(&mut self, stream: &mut AccessStream, accesses: u64) -> u64 {
        // SAFETY: the mapping is valid for reads and writes of `len` bytes while `self` lives,
        // `&mut self` excludes any other access through this value, and `run_iteration` keeps
        // every offset below `len`.
        unsafe { run_iteration(self.ptr.as_ptr(), self.len as u64, stream, accesses) }
    }

    /// Pages of the mapping that are resident now (`mincore`): the pages the accesses touched.
    pub fn resident_pages(&self) -> io::Result<usize> {
        let mut vec = vec![0u8; self.pages()];
        // SAFETY: `ptr` is page aligned (mmap) and `len` bytes are mapped; `vec` has one byte per
        // page of that range, as mincore requires.
        let rc = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count())
    }
}

impl Drop for WorkMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; nothing uses it afterwards.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Distinct pages that `accesses` offsets of `stream` fall in, for a region of `len` bytes
/// (what [`WorkMemory::resident_pages`] should report after the same accesses).
// `len` bytes are mapped in this process (see `WorkMemory`), so `len` and the offsets below it
// fit a `usize`.
#[allow(clippy::cast_possible_truncation)]
pub fn distinct_pages(mut stream: AccessStream, len: u64, accesses: u64) -> usize {
    let pages = (len as usize).div_ceil(PAGE_BYTES);
    let mut seen = vec![false; pages];
    for _ in 0..accesses {
        let page = (stream.next_offset() % len.max(1)) as usize / PAGE_BYTES;
        if let Some(s) = seen.get_mut(page) {
            *s = true;
        }
    }
    seen.iter().filter(|&&s| s).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorball_workload::Pattern;

    #[test]
    fn resident_pages_are_the_touched_pages() {
        let len = 1 << 20;
        let mut mem = WorkMemory::new(len).unwrap();
        assert_eq!(mem.pages(), 256);
        assert_eq!(mem.resident_pages().unwrap(), 0);
        let stream = AccessStream::new(Pattern::Random, len as u64, 99);
        let expected = distinct_pages(stream.clone(), len as u64, 100);
        let mut s = stream;
        mem.iterate(&mut s, 100);
        assert_eq!(mem.resident_pages().unwrap(), expected);
        assert!(
            expected > 50,
            "100 random accesses over 256 pages: {expected}"
        );
    }

    #[test]
    fn empty_is_refused() {
        assert!(WorkMemory::new(0).is_err());
    }
}
