//! What the pager knows about every registered page and its clock (second-chance) eviction.
//!
//! A page is `Absent` (never touched: the next fault installs a zeroed page), `Resident` (in
//! its VM's memfd, counted against the budget) or `Swapped` (in a slot of the swap file). The
//! clock is the ring of resident pages in the order they came in. The reference bit is the
//! host page-table entry itself: `/proc/self/pagemap` says whether the page is mapped, and
//! the hand clears the bit by unmapping the page with `MADV_DONTNEED` (on a shared memfd
//! mapping that drops the mapping only; the page stays in the file, and the guest's next touch
//! maps it again with an ordinary minor fault, which KVM follows through its MMU notifier).
//! A page the hand finds unmapped has not been touched for a whole turn and is evicted:
//! write-protected (so no write slips in while it is copied), written to the swap file, and
//! removed from the memfd (`MADV_REMOVE`), which makes the next touch a missing fault again.
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::swapfile::SwapFile;
use super::sys::{Fill, Uffd};
use crate::arch::x86_64::layout::PAGE_SIZE;

pub(crate) const PAGE: usize = 4096;
const _: () = assert!(PAGE as u64 == PAGE_SIZE);

/// One page's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// Never touched (or given back): a fault installs zeroes.
    Absent,
    /// In memory.
    Resident,
    /// In the swap file, in this slot.
    Swapped(u64),
}

/// A registered host range (one VM's RAM mapping).
#[derive(Debug)]
struct Range {
    start: usize,
    pages: Vec<Page>,
}

/// Counters of the pager (all VMs).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PagerCounts {
    /// Pages read back from the swap file (major faults).
    pub swap_ins: u64,
    /// Pages written to the swap file.
    pub swap_outs: u64,
    /// First touches answered with a zeroed page.
    pub zero_fills: u64,
    /// Second chances the clock gave (pages found referenced).
    pub second_chances: u64,
    /// Write faults on pages being evicted.
    pub wp_faults: u64,
    /// Resident pages now.
    pub resident_pages: u64,
    /// Highest resident pages seen.
    pub peak_resident_pages: u64,
}

/// How a missing fault was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Read back from swap: a major fault.
    SwapIn,
    /// A zeroed page.
    ZeroFill,
    /// Already there (another thread's fault on the same page), or not ours: woken only.
    Woken,
}

/// Every registered page, the clock, and the swap file.
pub struct PagerState {
    ranges: Vec<Option<Range>>,
    clock: VecDeque<(usize, usize)>,
    budget_pages: u64,
    /// Let pages exceed the budget (the swap file is full; the VMs are being ended).
    pub overcommit: bool,
    swap: SwapFile,
    pagemap: File,
    buf: Vec<u8>,
    /// Counters.
    pub counts: PagerCounts,
}

impl PagerState {
    /// An empty state for `budget_pages` resident pages, paging to `swap`.
    pub fn new(budget_pages: u64, swap: SwapFile) -> io::Result<Self> {
        Ok(Self {
            ranges: Vec::new(),
            clock: VecDeque::new(),
            budget_pages,
            overcommit: false,
            swap,
            pagemap: File::open("/proc/self/pagemap")?,
            buf: vec![0; PAGE],
            counts: PagerCounts::default(),
        })
    }

    /// The swap file.
    pub fn swap(&self) -> &SwapFile {
        &self.swap
    }

    /// Adds a range whose pages `resident` says are in memory already (the image the builder
    /// wrote); evicts down to the budget. Returns its id.
    pub fn add_range(&mut self, uffd: &Uffd, start: usize, resident: &[bool]) -> io::Result<usize> {
        let id = self.ranges.len();
        let mut pages = Vec::with_capacity(resident.len());
        for (i, &r) in resident.iter().enumerate() {
            pages.push(if r { Page::Resident } else { Page::Absent });
            if r {
                self.clock.push_back((id, i));
                self.counts.resident_pages += 1;
            }
        }
        self.ranges.push(Some(Range { start, pages }));
        self.note_peak();
        while self.counts.resident_pages > self.budget_pages {
            if !self.evict_one(uffd)? {
                break;
            }
        }
        Ok(id)
    }

    /// Forgets a range (its VM is going away): frees its swap slots; its resident pages no
    /// longer count.
    pub fn remove_range(&mut self, id: usize) {
        if let Some(range) = self.ranges.get_mut(id).and_then(Option::take) {
            for page in range.pages {
                match page {
                    Page::Resident => self.counts.resident_pages -= 1,
                    Page::Swapped(slot) => self.swap.discard(slot),
                    Page::Absent => {}
                }
            }
        }
        self.clock.retain(|&(r, _)| r != id);
    }

    fn note_peak(&mut self) {
        self.counts.peak_resident_pages = self
            .counts
            .peak_resident_pages
            .max(self.counts.resident_pages);
    }

    /// (range id, page index) of a host address, if registered.
    fn locate(&self, addr: usize) -> Option<(usize, usize)> {
        self.ranges.iter().enumerate().find_map(|(id, r)| {
            let r = r.as_ref()?;
            let index = addr.checked_sub(r.start)? / PAGE;
            (index < r.pages.len()).then_some((id, index))
        })
    }

    /// The state of the page at `addr`, if registered.
    pub fn page_at(&self, addr: usize) -> Option<Page> {
        let (id, index) = self.locate(addr)?;
        self.ranges[id].as_ref().map(|r| r.pages[index])
    }

    /// Resolves a missing fault at `addr`: makes room under the budget, then installs the page
    /// from swap or zeroed.
    pub fn resolve_missing(&mut self, uffd: &Uffd, addr: usize) -> io::Result<Resolved> {
        let page_addr = addr & !(PAGE - 1);
        let Some((id, index)) = self.locate(page_addr) else {
            uffd.wake(page_addr, PAGE)?;
            return Ok(Resolved::Woken);
        };
        let state = self.ranges[id]
            .as_ref()
            .map_or(Page::Absent, |r| r.pages[index]);
        if state == Page::Resident {
            uffd.wake(page_addr, PAGE)?;
            return Ok(Resolved::Woken);
        }
        while !self.overcommit && self.counts.resident_pages >= self.budget_pages {
            if !self.evict_one(uffd)? {
                break;
            }
        }
        let (fill, resolved) = match state {
            Page::Swapped(slot) => {
                let mut buf = std::mem::take(&mut self.buf);
                let read = self.swap.read_page(slot, &mut buf);
                let fill = read.and_then(|()| uffd.copy(page_addr, &buf));
                self.buf = buf;
                // The slot is freed only once its page is back: a failed copy leaves the page
                // in its slot for the next attempt (freeing it first could hand the slot to
                // another page, and a retry would install that page's contents here).
                let fill = fill?;
                self.swap.discard(slot);
                (fill, Resolved::SwapIn)
            }
            _ => (uffd.zero(page_addr, PAGE)?, Resolved::ZeroFill),
        };
        if fill == Fill::Exists {
            uffd.wake(page_addr, PAGE)?;
        }
        if let Some(range) = self.ranges[id].as_mut() {
            range.pages[index] = Page::Resident;
        }
        self.clock.push_back((id, index));
        self.counts.resident_pages += 1;
        match resolved {
            Resolved::SwapIn => self.counts.swap_ins += 1,
            Resolved::ZeroFill => self.counts.zero_fills += 1,
            Resolved::Woken => {}
        }
        self.note_peak();
        Ok(resolved)
    }

    /// Answers a write to a write-protected page: lifts the protection if the page is still
    /// in memory, else wakes the writer, whose retry becomes a missing fault.
    pub fn resolve_write_protect(&mut self, uffd: &Uffd, addr: usize) -> io::Result<()> {
        let page_addr = addr & !(PAGE - 1);
        self.counts.wp_faults += 1;
        match self.page_at(page_addr) {
            Some(Page::Resident) => uffd.write_protect(page_addr, PAGE, false),
            _ => uffd.wake(page_addr, PAGE),
        }
    }

    /// Whether the page at `addr` is mapped in this process's page tables (the reference bit).
    fn mapped(&self, addr: usize) -> io::Result<bool> {
        let mut entry = [0u8; 8];
        self.pagemap
            .read_exact_at(&mut entry, (addr / PAGE) as u64 * 8)?;
        Ok(u64::from_ne_bytes(entry) & (1 << 63) != 0)
    }

    /// Runs the clock hand until one page is evicted; false when nothing can be.
    pub fn evict_one(&mut self, uffd: &Uffd) -> io::Result<bool> {
        // Two turns at most: the first clears every reference bit it finds.
        let mut budget = self.clock.len().saturating_mul(2) + 1;
        while let Some((id, index)) = self.clock.pop_front() {
            let Some(range) = self.ranges.get(id).and_then(Option::as_ref) else {
                continue;
            };
            if range.pages.get(index) != Some(&Page::Resident) {
                continue;
            }
            let addr = range.start + index * PAGE;
            budget = budget.saturating_sub(1);
            if budget > 0 && self.mapped(addr)? {
                // Referenced since the last turn: clear the bit, second chance.
                // SAFETY: `addr` is a page of a registered guest RAM mapping that is still
                // mapped (ranges are removed before their mapping goes away); dropping the
                // mapping of a shared memfd page keeps its contents in the file.
                unsafe { madvise(addr, libc::MADV_DONTNEED)? };
                self.clock.push_back((id, index));
                self.counts.second_chances += 1;
                continue;
            }
            self.evict(uffd, id, index, addr)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn evict(&mut self, uffd: &Uffd, id: usize, index: usize, addr: usize) -> io::Result<()> {
        self.evict_with(uffd, (id, index, addr), || {})
    }

    /// Evicts the resident page at `addr` now (a seam for tests), running `meanwhile` once it
    /// is write-protected and before it is copied out.
    #[cfg(test)]
    pub(crate) fn evict_page(
        &mut self,
        uffd: &Uffd,
        addr: usize,
        meanwhile: impl FnOnce(),
    ) -> io::Result<()> {
        let (id, index) = self
            .locate(addr)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if self.page_at(addr) != Some(Page::Resident) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.clock.retain(|&p| p != (id, index));
        self.evict_with(uffd, (id, index, addr), meanwhile)
    }

    /// [`Self::evict`], with `meanwhile` run between the write protection and the copy: where a
    /// guest write to the page must wait, and must not be lost.
    fn evict_with(
        &mut self,
        uffd: &Uffd,
        (id, index, addr): (usize, usize, usize),
        meanwhile: impl FnOnce(),
    ) -> io::Result<()> {
        // From here on a write to the page waits for the pager, so the copy is the page.
        uffd.write_protect(addr, PAGE, true)?;
        meanwhile();
        // SAFETY: the page is resident in its memfd (only the pager removes pages, and this
        // thread holds the state), so reading it cannot fault to the pager; the mapping is
        // live while the range is registered.
        let page = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE) };
        let slot = match self.swap.write_page(page) {
            Ok(slot) => slot,
            Err(e) => {
                let _ = uffd.write_protect(addr, PAGE, false);
                self.clock.push_back((id, index));
                return Err(e);
            }
        };
        // SAFETY: as above; MADV_REMOVE frees the page from the memfd, and its contents are
        // in the swap slot.
        unsafe { madvise(addr, libc::MADV_REMOVE)? };
        if let Some(range) = self.ranges[id].as_mut() {
            range.pages[index] = Page::Swapped(slot);
        }
        self.counts.resident_pages -= 1;
        self.counts.swap_outs += 1;
        Ok(())
    }
}

/// `madvise(advice)` on the page at `addr`.
///
/// # Safety
/// `addr` must be a page of a mapping the caller may change this way.
unsafe fn madvise(addr: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: the caller vouches for the page.
    if unsafe { libc::madvise(addr as *mut libc::c_void, PAGE, advice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
