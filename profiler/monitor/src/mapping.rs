//! File mappings: read-only (`PROT_READ`, `MAP_SHARED`) for readers, read-write for publishers
//! (the VMM among them). Every mapping is registered with [`crate::sigbus`], so a file that
//! shrinks under it never kills the process: [`Mapping::check`] reports it instead.

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
    guard: Option<crate::sigbus::MappingGuard>,
}

// SAFETY: the mapping is plain shared memory accessed only through the ABI crate's atomics;
// moving or sharing the owner across threads is like sharing `&[AtomicU64]`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

fn map(file: File, len: usize, prot: libc::c_int) -> io::Result<Mapping> {
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
    let ptr =
        NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
    let mut mapping = Mapping {
        ptr,
        len,
        file,
        guard: None,
    };
    // On failure, dropping `mapping` unmaps it.
    mapping.guard = Some(crate::sigbus::register(ptr.as_ptr(), len)?);
    Ok(mapping)
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
        map(file, len, libc::PROT_READ)
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
        map(file, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// The mapped file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Start of the mapping.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Takes an exclusive `flock` on the file, held until the mapping is dropped: what marks a
    /// published host region as belonging to a running VMM.
    pub(crate) fn lock_exclusive(&self) -> io::Result<()> {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
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
        if self.guard.as_ref().is_some_and(|g| g.faulted()) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank under its mapping (its pages now read as zeros)",
            ));
        }
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
        // Unregistered before it is unmapped.
        self.guard = None;
        // SAFETY: unmaps exactly the mapping this value owns; nothing uses it afterwards.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_truncated_under_its_mappings_does_not_kill_the_process() {
        let dir = std::env::temp_dir().join(format!("mb-mapping-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("region");
        let _ = std::fs::remove_file(&path);
        let writer = Mapping::create_rw(&path, 64 << 10).expect("create");
        let reader = Mapping::open_read(&path).expect("map");
        // SAFETY: in bounds of a live mapping.
        unsafe { writer.as_ptr().add(8192).write_volatile(7) };
        // SAFETY: as above.
        assert_eq!(unsafe { reader.as_ptr().add(8192).read_volatile() }, 7);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(0)
            .expect("truncate");
        // Without the SIGBUS guard each of these accesses kills the test process.
        // SAFETY: in bounds of a live mapping (now past the file's end).
        assert_eq!(unsafe { reader.as_ptr().add(8192).read_volatile() }, 0);
        // SAFETY: as above.
        unsafe { writer.as_ptr().add(16384).write_volatile(1) };
        assert!(reader.check().is_err());
        assert!(writer.check().is_err());
        drop((reader, writer));
        let _ = std::fs::remove_file(&path);
    }
}
