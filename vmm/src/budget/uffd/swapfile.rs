//! The pager's own swap file: page-sized slots in a file created for the run (`O_EXCL`,
//! `O_NOFOLLOW`, mode 0600), space reserved up front with `fallocate` so a write never meets a
//! full disk for the pages that were planned for, and the file removed when the pager ends.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::arch::x86_64::layout::PAGE_SIZE;

/// A swap file of page slots.
#[derive(Debug)]
pub struct SwapFile {
    file: File,
    path: PathBuf,
    /// Slots the file holds now.
    capacity: u64,
    /// The slots never used yet start here.
    next: u64,
    /// Slots given back.
    free: Vec<u64>,
    /// The most slots the file may grow to (a full disk says so first; tests set a limit).
    limit: u64,
}

impl SwapFile {
    /// Creates `path` with room for `slots` pages reserved.
    pub fn create(path: &Path, slots: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let mut swap = Self {
            file,
            path: path.to_path_buf(),
            capacity: 0,
            next: 0,
            free: Vec::new(),
            limit: u64::MAX,
        };
        if let Err(e) = swap.reserve(slots) {
            drop(swap); // removes the file
            return Err(e);
        }
        Ok(swap)
    }

    fn reserve(&mut self, slots: u64) -> io::Result<()> {
        let bytes = slots.saturating_mul(PAGE_SIZE);
        if bytes > self.capacity * PAGE_SIZE {
            let len = libc::off_t::try_from(bytes)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
            // SAFETY: fallocate on a descriptor this object owns; no memory is passed.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, len) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            self.capacity = slots;
        }
        Ok(())
    }

    /// The same file, never growing past its reserved slots: a seam for tests of a full swap.
    #[cfg(test)]
    pub(crate) fn without_growth(mut self) -> Self {
        self.limit = self.capacity;
        self
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes reserved.
    pub fn reserved_bytes(&self) -> u64 {
        self.capacity * PAGE_SIZE
    }

    /// Writes one page into a free slot and returns the slot; when the reserved slots are used
    /// up the file grows by a quarter, and a disk that cannot hold that is an error (full swap).
    pub fn write_page(&mut self, page: &[u8]) -> io::Result<u64> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                if self.next >= self.capacity {
                    let grown = self.capacity + (self.capacity / 4).max(256);
                    if grown > self.limit {
                        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                    }
                    self.reserve(grown)?;
                }
                self.next += 1;
                self.next - 1
            }
        };
        if let Err(e) = self.file.write_all_at(page, slot * PAGE_SIZE) {
            self.free.push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    /// Reads the page in `slot` into `page`; the slot stays in use until [`Self::discard`].
    pub fn read_page(&self, slot: u64, page: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(page, slot * PAGE_SIZE)
    }

    /// Frees `slot` (its page is back in memory, or its VM is gone).
    pub fn discard(&mut self, slot: u64) {
        self.free.push(slot);
    }

    /// Slots in use.
    pub fn used(&self) -> u64 {
        self.next - self.free.len() as u64
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_come_back_and_the_file_is_removed() {
        let dir = std::env::temp_dir().join(format!("mb-uffd-swap-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let mut swap = SwapFile::create(&dir, 2).expect("swap file");
        let pages: Vec<Vec<u8>> = (0..5u8)
            .map(|i| vec![i + 1; crate::budget::uffd::clock::PAGE])
            .collect();
        let slots: Vec<u64> = pages
            .iter()
            .map(|p| swap.write_page(p).expect("write"))
            .collect();
        assert_eq!(swap.used(), 5);
        assert!(swap.reserved_bytes() >= 5 * PAGE_SIZE);
        let mut back = vec![0u8; crate::budget::uffd::clock::PAGE];
        swap.read_page(slots[3], &mut back).expect("read");
        assert_eq!(back, pages[3]);
        assert_eq!(swap.used(), 5, "a slot read stays in use until discarded");
        swap.discard(slots[3]);
        assert_eq!(swap.used(), 4);
        // A freed slot is reused.
        assert_eq!(swap.write_page(&pages[0]).expect("write"), slots[3]);
        assert!(SwapFile::create(&dir, 1).is_err(), "O_EXCL");
        drop(swap);
        assert!(!dir.exists());
    }
}
