//! File mappings: read-only (`PROT_READ`, `MAP_SHARED`) for readers, read-write for publishers.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use mirrorball_profiler_abi::{Region, RegionMut, HEADER_SIZE};

/// Largest region file a reader maps (a host ring of 16 Mi records of 4 KiB would be 64 GiB;
/// real ones are a few MiB).
pub const MAX_MAP_BYTES: u64 = 64 << 30;

/// A shared mapping of a whole file, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    file: File,
}

// SAFETY: the mapping is plain shared memory accessed only through the ABI crate's atomics;
// moving or sharing the owner across threads is like sharing `&[AtomicU64]`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

fn map(file: &File, len: usize, prot: libc::c_int) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh mapping chosen by the kernel; the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl Mapping {
    /// Maps an existing regular file read-only. The mapping covers the file's size at this
    /// moment, which must be at least one header and at most [`MAX_MAP_BYTES`].
    pub(crate) fn open_read(path: &Path) -> io::Result<Self> {
        let file = crate::rundir::open_regular(path)?;
        let size = file.metadata()?.len();
        if size < u64::from(HEADER_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{size} bytes: too small for a region"),
            ));
        }
        if size > MAX_MAP_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{size} bytes: too large for a region"),
            ));
        }
        let len = usize::try_from(size).map_err(io::Error::other)?;
        let ptr = map(&file, len, libc::PROT_READ)?;
        Ok(Self { ptr, len, file })
    }

    /// Creates (exclusively, mode 0600) a file of `len` bytes and maps it read-write.
    pub(crate) fn create_rw(path: &Path, len: usize) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)?;
        file.set_len(len as u64)?;
        let ptr = map(&file, len, libc::PROT_READ | libc::PROT_WRITE)?;
        Ok(Self { ptr, len, file })
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The mapping as a region with an unbounded lifetime.
    ///
    /// # Safety
    /// The caller must not use the region (or anything made from it) after this mapping is
    /// dropped.
    pub(crate) unsafe fn region_static(&self) -> io::Result<Region<'static>> {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes (page aligned, hence 8-aligned);
        // the caller keeps the mapping alive while it uses the region. This process never
        // writes a read-only mapping, and writes a writable one only through the ABI crate.
        unsafe { Region::from_raw(self.ptr.as_ptr(), self.len) }
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// The mapping as a writable region (only for mappings made by [`Mapping::create_rw`]).
    pub(crate) fn region_mut(&self) -> io::Result<RegionMut<'_>> {
        // SAFETY: a live read-write mapping of `len` bytes for the borrow of `self`; accessed
        // only through the ABI crate's atomics.
        unsafe { RegionMut::from_raw(self.ptr.as_ptr(), self.len) }
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Checks that the file still covers the whole mapping (reading past the end of a shrunk
    /// file would raise SIGBUS). Returns the file's link count: 0 once it has been removed.
    pub(crate) fn check(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.len() < self.len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file shrank from {} to {} bytes", self.len, meta.len()),
            ));
        }
        Ok(meta.nlink())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; nothing uses it afterwards.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
