//! Which pages of one of this process's mappings are in memory, and as what: runs of
//! consecutive pages in one [`PageState`], read from `/proc/self/pagemap` in one of two ways.
//!
//! - The `PAGEMAP_SCAN` ioctl (Linux 6.7+): the kernel walks only the page tables that exist and
//!   returns ranges, so a scan costs what the mapped pages cost — a clone that has touched
//!   nothing is scanned in microseconds, whatever its size. It does not say whether an anonymous
//!   page is mapped by this process alone, so it cannot tell pages KSM merged.
//! - Reading the 8-byte entry of every page (any kernel): the cost grows with the mapping's
//!   size (a read of 512 KiB of entries per 256 MiB), and each entry says whether the page is
//!   exclusively mapped.
//!
//! [`Pagemap::runs`] uses the ioctl where the kernel has it and the caller needs no exclusivity,
//! and reads entries otherwise; both give the same runs for the same memory (tested).
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

const PAGE: usize = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
const PM_EXCLUSIVE: u64 = 1 << 56;
/// Pagemap entries read per `pread` (512 KiB of entries = 256 MiB of memory).
const CHUNK_PAGES: usize = 64 * 1024;

/// `PAGEMAP_SCAN` page categories (`linux/fs.h`).
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
/// Ranges returned per ioctl call.
const SCAN_REGIONS: usize = 1024;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// What a page in memory (or swapped out) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// A page of the mapped file (for a private mapping: not written since it was mapped).
    File,
    /// An anonymous page: for a private mapping of a file, a copy a write made (or a fresh
    /// page). `exclusive` is false when another mapping shares it too (KSM merged it); a scan
    /// that was not asked to tell says true.
    Anon {
        /// Mapped by this mapping alone.
        exclusive: bool,
    },
    /// Swapped out.
    Swapped,
}

/// Consecutive pages in one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// The first page's index from the start of the scanned range.
    pub page: usize,
    /// Pages in the run.
    pub pages: usize,
    /// Their state.
    pub state: PageState,
}

/// This process's `/proc/self/pagemap`.
pub struct Pagemap {
    file: File,
    /// Whether the kernel has `PAGEMAP_SCAN` (until a call says otherwise).
    scan: bool,
    entries: Vec<u64>,
    regions: Vec<PageRegion>,
}

impl Pagemap {
    /// Opens this process's pagemap.
    pub fn open() -> std::io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/self/pagemap")?,
            scan: true,
            entries: Vec::new(),
            regions: Vec::new(),
        })
    }

    /// Replaces `out` with the runs of pages in memory or swapped out in the `len` bytes at host
    /// address `host` (page-aligned) of this process; pages never touched are in no run. With
    /// `exclusive`, anonymous pages say whether they are mapped here alone.
    pub fn runs(
        &mut self,
        host: usize,
        len: usize,
        exclusive: bool,
        out: &mut Vec<PageRun>,
    ) -> std::io::Result<()> {
        out.clear();
        if self.scan && !exclusive {
            match self.runs_by_scan(host, len, out) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
                    // An older kernel: read the entries from now on.
                    self.scan = false;
                    out.clear();
                }
                Err(e) => return Err(e),
            }
        }
        self.runs_by_read(host, len, exclusive, out)
    }

    fn runs_by_scan(
        &mut self,
        host: usize,
        len: usize,
        out: &mut Vec<PageRun>,
    ) -> std::io::Result<()> {
        self.regions.resize(SCAN_REGIONS, PageRegion::default());
        let end = host as u64 + len as u64;
        let mut from = host as u64;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start: from,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE,
                ..Default::default()
            };
            // SAFETY: `arg` is a `struct pm_scan_arg` of the size it states; `vec` points to
            // `vec_len` writable `struct page_region`s that live across the call; the ioctl
            // only reads this process's page tables.
            let filled = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            let Ok(filled) = usize::try_from(filled) else {
                return Err(std::io::Error::last_os_error());
            };
            for r in self.regions.iter().take(filled) {
                let state = if r.categories & PAGE_IS_SWAPPED != 0 {
                    PageState::Swapped
                } else if r.categories & PAGE_IS_FILE != 0 {
                    PageState::File
                } else {
                    PageState::Anon { exclusive: true }
                };
                let (Ok(start), Ok(end)) = (usize::try_from(r.start), usize::try_from(r.end))
                else {
                    continue;
                };
                let (Some(first), Some(bytes)) = (start.checked_sub(host), end.checked_sub(start))
                else {
                    continue;
                };
                push_run(out, first / PAGE, bytes / PAGE, state);
            }
            // A walk that did not fill the buffer went to the end. (`walk_end` is where a full
            // buffer stopped it; after a complete walk some kernels leave it at an earlier,
            // internal stop.)
            if filled < self.regions.len() || arg.walk_end <= from {
                break;
            }
            from = arg.walk_end;
        }
        Ok(())
    }

    fn runs_by_read(
        &mut self,
        host: usize,
        len: usize,
        exclusive: bool,
        out: &mut Vec<PageRun>,
    ) -> std::io::Result<()> {
        let pages = len / PAGE;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK_PAGES);
            self.entries.resize(n, 0);
            let offset = ((host / PAGE + done) * 8) as u64;
            self.file
                .read_exact_at(u64s_as_bytes(&mut self.entries[..n]), offset)?;
            for (i, &entry) in self.entries[..n].iter().enumerate() {
                let state = if entry & PM_SWAPPED != 0 {
                    PageState::Swapped
                } else if entry & PM_PRESENT == 0 {
                    continue;
                } else if entry & PM_FILE != 0 {
                    PageState::File
                } else {
                    PageState::Anon {
                        exclusive: !exclusive || entry & PM_EXCLUSIVE != 0,
                    }
                };
                push_run(out, done + i, 1, state);
            }
            done += n;
        }
        Ok(())
    }

    /// Never use `PAGEMAP_SCAN` (tests compare the two ways).
    #[cfg(test)]
    pub fn without_scan(mut self) -> Self {
        self.scan = false;
        self
    }
}

/// Appends a run, joined to the last one when it continues it.
fn push_run(out: &mut Vec<PageRun>, page: usize, pages: usize, state: PageState) {
    if let Some(last) = out.last_mut() {
        if last.state == state && last.page + last.pages == page {
            last.pages += pages;
            return;
        }
    }
    out.push(PageRun { page, pages, state });
}

/// Views a `u64` buffer as bytes (native endianness, as pagemap writes it).
fn u64s_as_bytes(words: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: u64 has no invalid bit patterns and no padding; the byte view covers exactly the
    // same memory, borrowed mutably for the same lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of an anonymous mapping touched in a pattern of more runs than one `PAGEMAP_SCAN`
    /// call returns: both ways of reading find exactly them. (Template clones, with file pages
    /// too, are compared in `sharing`.)
    #[test]
    fn the_scan_and_the_entries_agree() {
        let len = 16 << 20;
        let touched = |p: &usize| p.is_multiple_of(2) || (100..140).contains(p);
        // SAFETY: a fresh anonymous private mapping of `len` bytes, unmapped below.
        let anon = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(anon, libc::MAP_FAILED);
        // SAFETY: advice on the mapping made above: 4 KiB pages only, so that exactly the
        // touched pages are present wherever transparent huge pages are on.
        unsafe { libc::madvise(anon, len, libc::MADV_NOHUGEPAGE) };
        let base = anon.cast::<u8>();
        for page in (0..len / PAGE).filter(touched) {
            // SAFETY: inside the mapping.
            unsafe { base.add(page * PAGE).write_volatile(1) };
        }
        let mut scanned = Vec::new();
        let mut read = Vec::new();
        let mut pagemap = Pagemap::open().expect("pagemap");
        pagemap
            .runs(anon as usize, len, false, &mut scanned)
            .expect("scan");
        let mut reader = Pagemap::open().expect("pagemap").without_scan();
        reader
            .runs(anon as usize, len, false, &mut read)
            .expect("read");
        assert!(read.len() > SCAN_REGIONS, "{} runs", read.len());
        let pages: usize = read.iter().map(|r| r.pages).sum();
        assert_eq!(pages, (0..len / PAGE).filter(touched).count());
        assert!(read
            .iter()
            .all(|r| r.state == PageState::Anon { exclusive: true }));
        let differ = scanned.iter().zip(&read).position(|(a, b)| a != b);
        assert_eq!(
            (scanned.len(), differ),
            (read.len(), None),
            "first difference: {:?}",
            differ.map(|i| (scanned[i], read[i])).or(scanned
                .get(read.len()..read.len() + 3)
                .map(|s| (s[0], s[2])))
        );
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(anon, len) };
    }
}
