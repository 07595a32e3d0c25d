//! Opening the profiler's guest region: `/dev/mirrorball` (or a plain file with the same bytes),
//! mapped read-only and shared, then validated with the ABI crate.
//!
//! - A **regular file** is mapped whole: its size is known and pages past its end would raise
//!   `SIGBUS`. [`DeviceMap::check`] notices if it shrinks later.
//! - A **character device** (the driver) has no size. One page is mapped first; if the header
//!   claims a larger `region_size`, validation fails with `BadRegionSize { header, .. }`, and the
//!   region is mapped again with exactly that size (a page multiple of at most
//!   [`MAX_REGION_BYTES`]; the driver refuses mappings past its region) and validated again.
//!
//! Every byte of the region is hostile: nothing is read except through the ABI crate's checked
//! accessors.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use mirrorball_profiler_abi::{
    validate_guest_region, AbiError, GuestRegionView, Region, HEADER_SIZE, PAGE_SIZE,
};

/// Default device path.
pub const DEFAULT_DEVICE: &str = "/dev/mirrorball";
/// Largest region mapped (the driver's own limit is 1 GiB).
pub const MAX_REGION_BYTES: u64 = 1 << 30;

/// Why the region could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Opening, inspecting or mapping failed.
    #[error("{}: {error}", path.display())]
    Io {
        /// The device or file.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// Neither a regular file nor a character device.
    #[error("{}: not a regular file or character device", path.display())]
    NotARegion {
        /// The path.
        path: PathBuf,
    },
    /// A regular file whose size cannot hold a region.
    #[error("{}: {size} bytes is not a plausible region size", path.display())]
    BadFileSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The bytes are not a valid guest region.
    #[error("{}: not a valid mirrorball guest region: {error}", path.display())]
    Invalid {
        /// The device or file.
        path: PathBuf,
        /// What validation rejected.
        error: AbiError,
    },
}

/// A shared read-only mapping of the region, unmapped on drop.
#[derive(Debug)]
pub struct DeviceMap {
    ptr: NonNull<u8>,
    len: usize,
    file: File,
    path: PathBuf,
    regular: bool,
}

fn map_read_only(file: &File, len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh shared read-only mapping at an address the kernel picks; the result is
    // checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
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

/// The size to map again after validating a one-page probe failed with `error`: the header's
/// `region_size`, if that is what failed and it is a plausible size larger than the probe.
pub fn full_size(error: &AbiError) -> Option<usize> {
    match *error {
        AbiError::BadRegionSize { header, mapping }
            if header > mapping
                && header % u64::from(PAGE_SIZE) == 0
                && header <= MAX_REGION_BYTES =>
        {
            usize::try_from(header).ok()
        }
        _ => None,
    }
}

impl DeviceMap {
    /// Opens and maps `path` read-only, and validates the region (see the module docs).
    pub fn open(path: &Path) -> Result<Self, DeviceError> {
        let io_err = |error| DeviceError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if meta.is_file() {
            let size = meta.len();
            if size < u64::from(HEADER_SIZE) || size > MAX_REGION_BYTES {
                return Err(DeviceError::BadFileSize {
                    path: path.to_path_buf(),
                    size,
                });
            }
            let len = usize::try_from(size).map_err(|_| DeviceError::BadFileSize {
                path: path.to_path_buf(),
                size,
            })?;
            let map = Self::map(file, path, len, true)?;
            map.view()?;
            return Ok(map);
        }
        if !meta.file_type().is_char_device() {
            return Err(DeviceError::NotARegion {
                path: path.to_path_buf(),
            });
        }
        let probe = Self::map(file, path, PAGE_SIZE as usize, false)?;
        let failure = match probe.view() {
            Ok(_) => return Ok(probe),
            Err(e) => e,
        };
        let size = match &failure {
            DeviceError::Invalid { error, .. } => full_size(error),
            _ => None,
        };
        let Some(size) = size else {
            return Err(failure);
        };
        let file = probe.file.try_clone().map_err(io_err)?;
        drop(probe);
        let map = Self::map(file, path, size, false)?;
        map.view()?;
        Ok(map)
    }

    fn map(file: File, path: &Path, len: usize, regular: bool) -> Result<Self, DeviceError> {
        let ptr = map_read_only(&file, len).map_err(|error| DeviceError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(Self {
            ptr,
            len,
            file,
            path: path.to_path_buf(),
            regular,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is mapped (never, for an opened map).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mapping as an ABI region.
    pub fn region(&self) -> Result<Region<'_>, AbiError> {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes (page aligned, hence 8-aligned)
        // that stays mapped for the borrow of `self`. This process never writes it (PROT_READ);
        // other parties may, which the ABI crate's atomics-only access allows.
        unsafe { Region::from_raw(self.ptr.as_ptr(), self.len) }
    }

    /// The validated guest region.
    pub fn view(&self) -> Result<GuestRegionView<'_>, DeviceError> {
        self.region()
            .and_then(validate_guest_region)
            .map_err(|error| DeviceError::Invalid {
                path: self.path.clone(),
                error,
            })
    }

    /// Fails if a regular file no longer covers the mapping (reading it would raise `SIGBUS`).
    pub fn check(&self) -> io::Result<()> {
        if !self.regular {
            return Ok(());
        }
        let size = self.file.metadata()?.len();
        if size < self.len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: shrank from {} to {size} bytes",
                    self.path.display(),
                    self.len
                ),
            ));
        }
        Ok(())
    }
}

impl Drop for DeviceMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; every borrow of it (regions, views)
        // has ended, since they borrow `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_remaps_only_to_plausible_sizes() {
        let e = |header| AbiError::BadRegionSize {
            header,
            mapping: 4096,
        };
        assert_eq!(full_size(&e(786_432)), Some(786_432));
        assert_eq!(full_size(&e(4096)), None);
        assert_eq!(full_size(&e(8191)), None);
        assert_eq!(full_size(&e(2 << 30)), None);
        assert_eq!(full_size(&e(u64::MAX)), None);
        assert_eq!(full_size(&AbiError::BadHeaderSize(0)), None);
    }
}
