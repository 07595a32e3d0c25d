//! Reads satisfied by mapping instead of copying (`--disk base.img,map=on`): Disco's shared
//! disk pages.
//!
//! This module owns [`BaseMapper`], one VM's mapper of base-image pages into its guest memory,
//! and [`MappedPages`], the record of which guest pages it mapped (read by the VM's sharing
//! scanner). When a guest reads a page-sized, page-aligned block of the base image that its
//! overlay does not hold into a page-aligned, page-sized piece of guest memory, the device maps
//! the base file's page over that guest page (`mmap(MAP_PRIVATE | MAP_FIXED)` of the base file
//! at the guest page's host address) instead of copying it. Every VM that reads the block then
//! maps the same page-cache page: one machine page for all of them.
//!
//! Why it is correct:
//! - The mapping is private: a later guest (or VMM) write to the page copies it (the kernel's
//!   copy-on-write), so the base file is never written and no other VM sees the write. The base
//!   is opened read-only and this process never writes it, so the mapped page holds what a copy
//!   would have held.
//! - KVM maps guest memory through the host's page tables and follows changes to them (MMU
//!   notifiers): replacing the host mapping under a memslot makes KVM drop its translation of
//!   that guest page, and the next guest access faults the new page in.
//! - `MAP_FIXED` replaces the old page atomically: a vCPU or VMM thread that touches the page at
//!   the same time (only a misbehaving guest would: the page is the device's to fill) sees
//!   either the old or the new page, never a hole.
//! - A block the overlay holds (written by this VM) is copied from the overlay, never mapped.
//! - Each mapped page is read once right away, so it is present in the host's page tables
//!   (the base's page-cache page, read-only) like a copied page would be: the sharing scan and
//!   snapshots (which read present pages and the memfd's data) see it. (`MAP_POPULATE` would
//!   not do: on a private writable mapping it breaks copy-on-write at once.)
//!
//! Bounds: every mapping may split a VMA in three, and the process may hold at most
//! `vm.max_map_count` VMAs (65,530 by default); when that runs out `mmap` fails. So each VM gets
//! a budget of mappings ([`map_budget`]); once spent, reads are copied as without `map=on`
//! (counted as fallbacks). If an `mmap` fails all the same, the pages are replaced by fresh
//! anonymous memory (the read then fills them by copying), so guest memory is never left
//! unmapped.
//!
//! Costs and limits: a mapping costs more than a 4 KiB copy (see the `disk` bench group), pays
//! off only for blocks many VMs read, and the guest's first write to a mapped page is a
//! copy-on-write break. Guest memory that was a shared memfd mapping becomes a private file
//! mapping at those pages (the memfd's page there is unused from then on). Pages mapped from the
//! base are not offered to KSM. The base image must not shrink while VMs run: a mapped page past
//! the file's new end would fault (`SIGBUS`).
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::disk::{BaseImage, BLOCK_SIZE};

/// Guest page size the mapper works in.
pub const PAGE_SIZE: u64 = 4096;

/// Which guest pages a VM's disk mapped from the base image: one bit per guest page frame,
/// set by the device (on a vCPU thread), read by the VM's sharing scanner. Bits are never
/// cleared: a mapped page the guest later wrote is an anonymous page, which the scanner tells
/// apart by itself.
#[derive(Debug)]
pub struct MappedPages {
    bits: Vec<AtomicU64>,
}

impl MappedPages {
    /// Room for guest pages below `top` (the end of guest RAM).
    pub fn new(top: u64) -> Self {
        let pages = top.div_ceil(PAGE_SIZE);
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        Self {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn set(&self, gpa: u64) {
        let page = gpa / PAGE_SIZE;
        if let Some(word) = usize::try_from(page / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
        {
            word.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Whether the guest page holding `gpa` was ever mapped from the base.
    pub fn contains(&self, gpa: u64) -> bool {
        let page = gpa / PAGE_SIZE;
        usize::try_from(page / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }
}

/// Mappings one VM may make when `vms` VMs of the process map: half of `vm.max_map_count` for
/// all of them (the rest of the process keeps the other half), two VMAs per mapping at worst.
pub fn map_budget(vms: usize) -> u64 {
    let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(65_530);
    max / 2 / 2 / (vms.max(1) as u64)
}

/// What the mapper did, for the device's counters.
#[derive(Debug, Default)]
pub struct MapCounters {
    /// Guest pages mapped from the base.
    pub mapped_pages: AtomicU64,
    /// `mmap` calls that mapped them.
    pub mappings: AtomicU64,
    /// Pages that could have been mapped but were copied (budget spent, or `mmap` failed).
    pub fallback_pages: AtomicU64,
}

/// One VM's mapper of base pages into its guest memory.
#[derive(Debug)]
pub struct BaseMapper {
    mem: GuestMemoryMmap,
    base: Arc<BaseImage>,
    budget: u64,
    pages: Arc<MappedPages>,
}

impl BaseMapper {
    /// A mapper into `mem` of `base`'s pages that makes at most `budget` mappings, recording
    /// them in `pages`.
    pub fn new(
        mem: GuestMemoryMmap,
        base: Arc<BaseImage>,
        budget: u64,
        pages: Arc<MappedPages>,
    ) -> Self {
        Self {
            mem,
            base,
            budget,
            pages,
        }
    }

    /// Mappings left.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The base image.
    pub fn base(&self) -> &BaseImage {
        &self.base
    }

    /// Maps `len` bytes of the base at `offset` over guest memory at `gpa`. All three must be
    /// page multiples, the range must lie inside the base and inside one guest memory region.
    /// Returns whether it mapped; when not, guest memory is still mapped and the caller copies.
    pub fn map(
        &mut self,
        gpa: GuestAddress,
        offset: u64,
        len: u64,
        counters: &MapCounters,
    ) -> bool {
        let pages = len / PAGE_SIZE;
        let aligned = gpa.0.is_multiple_of(PAGE_SIZE)
            && offset.is_multiple_of(BLOCK_SIZE)
            && len.is_multiple_of(PAGE_SIZE)
            && len > 0
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.base.len());
        if !aligned {
            return false;
        }
        if self.budget == 0 {
            counters.fallback_pages.fetch_add(pages, Ordering::Relaxed);
            return false;
        }
        let Some(host) = self.host_range(gpa, len) else {
            return false;
        };
        let (Ok(file_offset), Ok(size)) = (libc::off_t::try_from(offset), usize::try_from(len))
        else {
            return false;
        };
        // SAFETY: `host..host + size` lies inside one mapping of this VM's guest memory (checked
        // by `host_range`), which `self.mem` keeps mapped. MAP_FIXED replaces exactly those
        // pages with a private view of the base file of the same extent, so the range stays
        // valid readable and writable memory; guest memory is only ever accessed through raw
        // pointers (vm-memory's volatile accessors, KVM), never through Rust references that
        // this could invalidate.
        let got = unsafe {
            libc::mmap(
                host.cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.base.file().as_raw_fd(),
                file_offset,
            )
        };
        self.budget -= 1;
        if got != host.cast() {
            counters.fallback_pages.fetch_add(pages, Ordering::Relaxed);
            if got == libc::MAP_FAILED {
                Self::refill(host, size);
            }
            return false;
        }
        for page in 0..pages {
            self.pages.set(gpa.0 + page * PAGE_SIZE);
            // Fault the page in now (read-only: the page-cache page itself), so the host page
            // tables hold it from here on as they would hold a copy: the sharing scan counts it
            // and a snapshot, which reads present pages and the memfd's data, does not miss it.
            // SAFETY: page `page` of the `size` bytes just mapped readable at `host`.
            unsafe {
                host.add(usize::try_from(page * PAGE_SIZE).unwrap_or(0))
                    .read_volatile();
            }
        }
        counters.mapped_pages.fetch_add(pages, Ordering::Relaxed);
        counters.mappings.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// After a failed `MAP_FIXED` the old pages may be gone: put fresh anonymous memory there
    /// (the read that follows fills it).
    fn refill(host: *mut u8, size: usize) {
        // SAFETY: as in `map`: the range belongs to this VM's guest memory; fresh anonymous
        // pages of the same extent keep it valid memory.
        unsafe {
            libc::mmap(
                host.cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            );
        }
    }

    /// The host address of `gpa..gpa + len` if it lies inside one guest memory region.
    fn host_range(&self, gpa: GuestAddress, len: u64) -> Option<*mut u8> {
        let region = self.mem.find_region(gpa)?;
        let start = gpa.0.checked_sub(region.start_addr().0)?;
        let end = start.checked_add(len)?;
        if end > region.len() {
            return None;
        }
        let host = self.mem.get_host_address(gpa).ok()?;
        (host as u64).is_multiple_of(PAGE_SIZE).then_some(host)
    }
}
