//! Swap for the machine-memory budget: what the host already has (`/proc/swaps`), and a swap
//! file this process creates (`O_EXCL`, mode 0600, fully allocated, a version-1 swap header
//! written here), turns on with `swapon(2)` and turns off and deletes again.
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::BudgetError;

const PAGE: u64 = 4096;
const PAGE_LEN: usize = 4096;

/// One line of `/proc/swaps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapArea {
    /// The file or device.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Used bytes.
    pub used: u64,
}

/// Parses `/proc/swaps` (sizes are KiB there).
pub fn parse_swaps(text: &str) -> Vec<SwapArea> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Filename Type Size Used Priority; the kernel escapes blanks in names.
            let size = f.get(2)?.parse::<u64>().ok()?;
            let used = f.get(3)?.parse::<u64>().ok()?;
            Some(SwapArea {
                path: PathBuf::from(f.first()?.replace("\\040", " ")),
                size: size * 1024,
                used: used * 1024,
            })
        })
        .collect()
}

/// The host's active swap areas (none when `/proc/swaps` cannot be read).
pub fn active() -> Vec<SwapArea> {
    std::fs::read_to_string("/proc/swaps")
        .map(|t| parse_swaps(&t))
        .unwrap_or_default()
}

/// Free bytes of all active swap areas.
pub fn free_bytes() -> u64 {
    active().iter().map(|a| a.size.saturating_sub(a.used)).sum()
}

/// The 4 KiB header page of a version-1 swap area of `pages` pages (page 0 is the header).
fn header_page(pages: u64) -> Result<Vec<u8>, BudgetError> {
    let last_page = u32::try_from(pages - 1).map_err(|_| BudgetError::SwapTooLarge)?;
    let mut page = vec![0u8; PAGE_LEN];
    // The header sits after 1 KiB of boot-block space: version, last page, bad-page count, uuid,
    // label; the magic ends the page.
    page[1024..1028].copy_from_slice(&1u32.to_ne_bytes());
    page[1028..1032].copy_from_slice(&last_page.to_ne_bytes());
    let label = b"mirrorball";
    page[1036 + 16..1036 + 16 + label.len()].copy_from_slice(label);
    let magic = b"SWAPSPACE2";
    page[PAGE_LEN - magic.len()..].copy_from_slice(magic);
    Ok(page)
}

fn c_path(path: &Path) -> Result<CString, BudgetError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| BudgetError::SwapPath {
        path: path.to_path_buf(),
        why: "contains a NUL byte".into(),
    })
}

/// Free bytes of the file system holding `dir`.
pub(crate) fn fs_free_bytes(dir: &Path) -> std::io::Result<u64> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path, `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Turns swap on for `path`.
pub fn swapon(path: &Path) -> Result<(), BudgetError> {
    let c = c_path(path)?;
    // SAFETY: `c` is a NUL-terminated path; flags 0 = default priority.
    if unsafe { libc::swapon(c.as_ptr(), 0) } != 0 {
        return Err(BudgetError::Swapon {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Turns swap off for `path` (pages in it are read back into memory first).
pub fn swapoff(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated path.
    if unsafe { libc::swapoff(c.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Swap this process turned on: a file it created (deleted again) or one the user named.
#[derive(Debug)]
pub struct OwnedSwap {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Whether this process created it (and so deletes it).
    pub created: bool,
}

impl OwnedSwap {
    /// Creates a swap file of `size` bytes at `path` (which must not exist) and turns it on.
    /// Refuses when the file system would keep less than `keep_free` bytes free.
    pub fn create(path: &Path, size: u64, keep_free: u64) -> Result<Self, BudgetError> {
        let size = size.div_ceil(PAGE) * PAGE;
        let pages = size / PAGE;
        if pages < 10 {
            return Err(BudgetError::SwapTooSmall);
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let free = fs_free_bytes(dir).map_err(|e| BudgetError::SwapPath {
            path: dir.to_path_buf(),
            why: e.to_string(),
        })?;
        if free < size.saturating_add(keep_free) {
            return Err(BudgetError::NoSwapSpace {
                dir: dir.to_path_buf(),
                needed_mib: size.saturating_add(keep_free) >> 20,
                free_mib: free >> 20,
            });
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| BudgetError::SwapPath {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        let owned = Self {
            path: path.to_path_buf(),
            size,
            created: true,
        };
        // From here on, dropping `owned` deletes the file.
        let filled = allocate(&mut file, size, pages);
        drop(file);
        filled.map_err(|e| BudgetError::SwapPath {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        swapon(path)?;
        Ok(owned)
    }

    /// Turns on a swap file or device the user named (already formatted with mkswap).
    pub fn existing(path: &Path) -> Result<Self, BudgetError> {
        let size = std::fs::metadata(path)
            .map_err(|e| BudgetError::SwapPath {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?
            .len();
        swapon(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            size,
            created: false,
        })
    }

    /// Turns the swap off and deletes the file if this process created it. Errors are reported
    /// as one line on stderr: this runs on the way out.
    pub fn release(&mut self) {
        if active().iter().any(|a| a.path == self.path) {
            if let Err(e) = swapoff(&self.path) {
                eprintln!(
                    "vmm: warning: cannot turn swap off on {}: {e}",
                    self.path.display()
                );
            }
        }
        if self.created {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!(
                        "vmm: warning: cannot delete the swap file {}: {e}",
                        self.path.display()
                    );
                }
            }
            self.created = false;
        }
    }
}

impl Drop for OwnedSwap {
    fn drop(&mut self) {
        self.release();
    }
}

/// Allocates every block of the file (swap files must have no holes) and writes the header.
fn allocate(file: &mut File, size: u64, pages: u64) -> std::io::Result<()> {
    let len = libc::off_t::try_from(size)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid open fd and a range inside the requested length.
    let rc = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(file), 0, len) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let header = header_page(pages).map_err(|e| std::io::Error::other(e.to_string()))?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_swaps_parse() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /var/tmp/a\\040b  file  1048572  4096  -2\n/dev/vdb partition 100 0 -3\n";
        let areas = parse_swaps(text);
        assert_eq!(areas.len(), 2);
        assert_eq!(areas[0].path, PathBuf::from("/var/tmp/a b"));
        assert_eq!(
            (areas[0].size, areas[0].used),
            (1048572 * 1024, 4096 * 1024)
        );
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn header_has_magic_and_last_page() {
        let page = header_page(256).expect("header");
        assert_eq!(&page[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_ne_bytes(page[1024..1028].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_ne_bytes(page[1028..1032].try_into().unwrap()),
            255
        );
        assert!(header_page(1 << 40).is_err());
    }
}
