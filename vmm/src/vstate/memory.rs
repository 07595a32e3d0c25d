//! Guest RAM: one memfd per VM, mapped shared into the VMM and registered with KVM.
//!
//! memfd (not anonymous memory) so that later a template's pages can be mapped copy-on-write
//! into clones and so host tools can see a VM's memory as a file. The memfd is sized with
//! `ftruncate` and populated lazily: the first guest touch of a page is a host page fault charged
//! to the vCPU thread that made it.
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START, PAGE_SIZE};

/// Smallest guest RAM accepted.
pub const MIN_RAM_BYTES: u64 = 2 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or below the minimum.
    #[error("guest memory of {0} bytes is too small (minimum {MIN_RAM_BYTES} bytes)")]
    TooSmall(u64),
    /// The size is not a whole number of pages.
    #[error("guest memory of {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    /// The size exceeds the host's physical memory.
    #[error("guest memory of {requested} MiB exceeds the host's {host} MiB of RAM")]
    ExceedsHost {
        /// MiB asked for.
        requested: u64,
        /// MiB the host has.
        host: u64,
    },
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// Mapping the memory failed.
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// Guest RAM of one VM.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    file: File,
    ranges: Vec<(u64, u64)>,
    size: u64,
}

/// Splits `size` bytes of RAM around the 32-bit device hole: (guest address, length) pairs.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Total RAM of the host in bytes, from /proc/meminfo.
pub fn host_ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn create_memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(name).map_err(|e| MemoryError::Memfd(e.into()))?;
    // SAFETY: `cname` is a valid NUL-terminated string; the call only returns a new fd.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM backed by a new memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_RAM_BYTES {
            return Err(MemoryError::TooSmall(size));
        }
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Unaligned(size));
        }
        if let Some(host) = host_ram_bytes() {
            if size > host {
                return Err(MemoryError::ExceedsHost {
                    requested: size >> 20,
                    host: host >> 20,
                });
            }
        }
        let file = create_memfd("mirrorball-guest-ram", size)?;
        let ranges = ram_ranges(size);
        let mut offset = 0;
        let mut regions = Vec::new();
        for &(start, len) in &ranges {
            let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
            regions.push((GuestAddress(start), len as usize, Some(fo)));
            offset += len;
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(regions)?;
        Ok(Self {
            memory,
            file,
            ranges,
            size,
        })
    }

    /// The mapped memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// RAM ranges as (guest address, length).
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd backing the RAM.
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestRam::new(0), Err(MemoryError::TooSmall(0))));
        assert!(matches!(
            GuestRam::new((4 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
        let host = host_ram_bytes().expect("meminfo");
        let too_big = (host / PAGE_SIZE + 1024) * PAGE_SIZE;
        assert!(matches!(
            GuestRam::new(too_big),
            Err(MemoryError::ExceedsHost { .. })
        ));
    }

    #[test]
    fn memory_is_backed_by_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(4 << 20).expect("ram");
        ram.memory()
            .write_obj(0xfeed_u32, GuestAddress(0x2000))
            .expect("write");
        let mut buf = [0u8; 4];
        ram.file().read_exact_at(&mut buf, 0x2000).expect("read");
        assert_eq!(u32::from_le_bytes(buf), 0xfeed);
        assert_eq!(ram.size(), 4 << 20);
    }
}
