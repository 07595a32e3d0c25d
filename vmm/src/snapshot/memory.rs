//! Guest memory as a snapshot file: the RAM file's layout (its ranges one after another, as a
//! template's memfd), sparse. Only pages that may hold data are read — present or swapped in the
//! VM's mappings (`/proc/self/pagemap`) or data in the backing file (`SEEK_DATA`), so a clone's
//! template pages count and untouched pages are never faulted in — and of those only non-zero
//! pages are written: everything else stays a hole. A CRC-32 over (offset, page) of every page
//! written lets a restore check the file.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::vstate::memory::GuestRam;

const PAGE: usize = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// What writing the memory file did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryWritten {
    /// Pages written (non-zero pages).
    pub pages: u64,
    /// CRC-32 over (offset, page).
    pub crc: u32,
}

/// Data extents of `file` within `[start, end)` (`SEEK_DATA`/`SEEK_HOLE`).
fn data_extents(file: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let Ok(off) = libc::off_t::try_from(at) else {
            break;
        };
        // SAFETY: lseek on a descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `at`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (Ok(d), Ok(h)) = (u64::try_from(data), u64::try_from(hole.max(data))) else {
            break;
        };
        if d >= end {
            break;
        }
        out.push((d, h.min(end)));
        if h <= at {
            break;
        }
        at = h;
    }
    out
}

fn crc_page(hasher: &mut crc32fast::Hasher, offset: u64, page: &[u8]) {
    hasher.update(&offset.to_le_bytes());
    hasher.update(page);
}

/// Walks the data extents of a file page by page, in increasing offsets.
struct Extents {
    extents: std::iter::Peekable<std::vec::IntoIter<(u64, u64)>>,
}

impl Extents {
    fn of(file: &File, start: u64, end: u64) -> Self {
        Self {
            extents: data_extents(file, start, end).into_iter().peekable(),
        }
    }

    /// Whether the page at `offset` (not below the last one asked) may hold data.
    fn holds(&mut self, offset: u64) -> bool {
        while self.extents.peek().is_some_and(|&(_, e)| e <= offset) {
            self.extents.next();
        }
        self.extents.peek().is_some_and(|&(s, _)| s <= offset)
    }
}

/// Writes `ram` into `out` (already created, empty) as a sparse file. The RAM of a lazily
/// restored VM takes the pages it has not loaded yet from its snapshot's memory file, without
/// loading them.
pub fn write(ram: &GuestRam, out: &File) -> io::Result<MemoryWritten> {
    out.set_len(ram.size())?;
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut hasher = crc32fast::Hasher::new();
    let mut pages = 0u64;
    let mut file_offset = 0u64;
    let mut not_loaded = vec![0u8; PAGE];
    for (host, len) in ram.host_ranges() {
        let npages = len / PAGE;
        let end = file_offset + len as u64;
        let mut in_ram_file = Extents::of(ram.file(), file_offset, end);
        // A lazily restored VM's snapshot file, with its data extents.
        let mut lazy_source = ram
            .lazy()
            .map(|l| (l.source(), Extents::of(l.source(), file_offset, end)));
        let mut entries = vec![0u8; npages * 8];
        pagemap.read_exact_at(&mut entries, (host / PAGE * 8) as u64)?;
        for i in 0..npages {
            let offset = file_offset + (i * PAGE) as u64;
            let in_file = in_ram_file.holds(offset);
            let word = u64::from_le_bytes(entries[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            let page = if in_file || word & (PM_PRESENT | PM_SWAPPED) != 0 {
                // SAFETY: the page lies inside one of the VM's RAM mappings, alive while `ram`
                // is; the vCPUs are parked, so nothing writes it while it is read.
                unsafe { std::slice::from_raw_parts((host + i * PAGE) as *const u8, PAGE) }
            } else if let Some((source, extents)) = lazy_source.as_mut() {
                // Never touched since a lazy restore: the page is still the snapshot's.
                if !extents.holds(offset) {
                    continue;
                }
                source.read_exact_at(&mut not_loaded, offset)?;
                &not_loaded
            } else {
                continue;
            };
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            out.write_all_at(page, offset)?;
            crc_page(&mut hasher, offset, page);
            pages += 1;
        }
        file_offset += len as u64;
    }
    out.sync_all()?;
    Ok(MemoryWritten {
        pages,
        crc: hasher.finalize(),
    })
}

/// Recomputes what [`write`] recorded from the file alone (its data extents, non-zero pages).
pub fn verify(file: &File, size: u64) -> io::Result<MemoryWritten> {
    let mut hasher = crc32fast::Hasher::new();
    let mut pages = 0u64;
    let mut page = vec![0u8; PAGE];
    for (start, end) in data_extents(file, 0, size) {
        let mut offset = start / PAGE as u64 * PAGE as u64;
        while offset < end {
            file.read_exact_at(&mut page, offset)?;
            if page.iter().any(|&b| b != 0) {
                crc_page(&mut hasher, offset, &page);
                pages += 1;
            }
            offset += PAGE as u64;
        }
    }
    Ok(MemoryWritten {
        pages,
        crc: hasher.finalize(),
    })
}
