//! The pager's paths that a guest cannot be made to hit on demand, on a plain shared memfd
//! mapping that stands in for a VM's RAM: the test's own threads are the "vCPUs" (userfaultfd
//! reports their faults the same way).
//!
//! - A write to a page while it is being evicted (between its write protection and its removal
//!   from the memfd) waits, and is not lost: the page written, evicted, read back holds it.
//! - Many threads writing pages while the pager evicts them: every page keeps its last value.
//! - The swap file running full: the VMs are ended once (the callback the SIGTERM stands for),
//!   no thread waits forever, and every page still reads back what was written to it.
//! - A swap-in whose copy into guest memory fails keeps the page's swap slot (freeing it first
//!   could give the slot to another page, and the retry would install that page's contents).
//!
//! They need userfaultfd with shmem write-protect support (root): without it they say so and
//! pass, unless `CI` is set.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::clock::{Page, PagerState, PAGE};
use super::swapfile::SwapFile;
use super::sys::{self, Uffd};
use super::Pager;

/// Longest a test waits for its threads: past it, a fault was never answered.
const HANG: Duration = Duration::from_secs(30);

/// A shared memfd mapping of `pages` pages, unmapped on drop.
struct Ram {
    start: usize,
    pages: usize,
    _memfd: OwnedFd,
}

impl Ram {
    fn new(pages: usize) -> Self {
        let len = pages * PAGE;
        // SAFETY: a NUL-terminated name and flags; returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"mb-pager-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = libc::off_t::try_from(len).expect("size");
        // SAFETY: sizes the memfd this test owns.
        assert_eq!(unsafe { libc::ftruncate(memfd.as_raw_fd(), size) }, 0);
        // SAFETY: a new shared mapping of the whole memfd; nothing else is mapped there.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        Self {
            start: addr as usize,
            pages,
            _memfd: memfd,
        }
    }

    fn page(&self, index: usize) -> usize {
        assert!(index < self.pages);
        self.start + index * PAGE
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping this object made; no reference into it outlives it.
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.pages * PAGE) };
    }
}

/// Writes `value` at byte `offset` of the page at `addr` (may fault to the pager).
fn poke(addr: usize, offset: usize, value: u64) {
    assert!(offset + 8 <= PAGE);
    // SAFETY: `addr` is a page of a live test mapping (`Ram`), `offset` is inside it and
    // 8-aligned by every caller; volatile so the access really happens on this thread.
    unsafe { std::ptr::write_volatile((addr + offset) as *mut u64, value) };
}

/// Reads the value at byte `offset` of the page at `addr` (may fault to the pager).
fn peek(addr: usize, offset: usize) -> u64 {
    assert!(offset + 8 <= PAGE);
    // SAFETY: as in `poke`.
    unsafe { std::ptr::read_volatile((addr + offset) as *const u64) }
}

/// A userfaultfd as the pager opens it, or `None` after saying why there is none.
fn uffd_or_skip(test: &str) -> Option<Uffd> {
    match Uffd::open(sys::FEATURE_THREAD_ID | sys::FEATURE_MISSING_SHMEM | sys::FEATURE_WP_SHMEM) {
        Ok(uffd) => Some(uffd),
        Err(e) => {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
            assert!(!ci, "{test}: userfaultfd is not usable under CI: {e}");
            eprintln!("skipped {test}: userfaultfd is not usable here: {e}");
            None
        }
    }
}

fn swap_path(test: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("mb-uffd-{test}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// One range of a [`Ram`] under a [`PagerState`] whose faults the test answers itself.
struct Served {
    uffd: Uffd,
    ram: Ram,
    state: PagerState,
}

impl Served {
    /// `pages` pages, none touched yet, under a budget of `budget_pages`; `None` after saying
    /// why `test` cannot run.
    fn new(test: &str, pages: usize, budget_pages: u64) -> Option<Self> {
        let uffd = uffd_or_skip(test)?;
        let ram = Ram::new(pages);
        let swap = SwapFile::create(&swap_path(test), budget_pages).expect("swap file");
        let mut state = PagerState::new(budget_pages, swap).expect("state");
        uffd.register(ram.start, pages * PAGE).expect("register");
        state
            .add_range(&uffd, ram.start, &vec![false; pages])
            .expect("range");
        Some(Self { uffd, ram, state })
    }

    /// Runs `work` on a thread of its own while this thread answers its faults through the
    /// state, as the fault thread does; panics when `work` panics or still waits after
    /// [`HANG`].
    fn run<T: Send + 'static>(&mut self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let worker = std::thread::spawn(work);
        let start = Instant::now();
        let mut messages = Vec::new();
        while !worker.is_finished() {
            assert!(start.elapsed() < HANG, "a fault was never answered");
            if !fault_pending(&self.uffd, Duration::from_millis(10)) {
                continue;
            }
            self.uffd.read_messages(&mut messages).expect("read faults");
            for msg in &messages {
                let page = usize::try_from(msg.address).expect("address") & !(PAGE - 1);
                if msg.flags & sys::PAGEFAULT_FLAG_WP != 0 {
                    let wp = self.state.resolve_write_protect(&self.uffd, page);
                    wp.expect("wp fault");
                } else {
                    let missing = self.state.resolve_missing(&self.uffd, page);
                    missing.expect("missing fault");
                }
            }
        }
        worker.join().expect("worker")
    }

    /// Evicts the page at `addr` (see [`PagerState::evict_page`]).
    fn evict(&mut self, addr: usize, meanwhile: impl FnOnce(&Uffd)) {
        let uffd = &self.uffd;
        let evicted = self.state.evict_page(uffd, addr, || meanwhile(uffd));
        evicted.expect("evict");
    }

    fn set_registered(&self, registered: bool) {
        let (start, len) = (self.ram.start, self.ram.pages * PAGE);
        if registered {
            self.uffd.register(start, len).expect("register");
        } else {
            self.uffd.unregister(start, len).expect("unregister");
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.uffd.unregister(self.ram.start, self.ram.pages * PAGE);
    }
}

/// A pager of `budget_pages` paging to `swap` with `pages` pages of [`Ram`] registered, and how
/// many times it ended the VMs.
struct Paged {
    ended: Arc<AtomicUsize>,
    registration: Option<super::Registration>,
    ram: Ram,
    pager: Arc<Pager>,
}

impl Paged {
    fn new(uffd: Uffd, budget_pages: usize, swap: SwapFile, pages: usize) -> Self {
        let ended = Arc::new(AtomicUsize::new(0));
        let counter = ended.clone();
        let end_vms = Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let budget = (budget_pages * PAGE) as u64;
        let pager = Pager::start_with(uffd, budget, swap, true, end_vms).expect("pager");
        let ram = Ram::new(pages);
        let registration = pager.register(&[(ram.start, pages * PAGE)]);
        Self {
            ended,
            registration: Some(registration.expect("register")),
            ram,
            pager,
        }
    }
}

impl Drop for Paged {
    fn drop(&mut self) {
        // The registration goes before the mapping.
        self.registration.take();
    }
}

/// Waits for `worker` (a "vCPU" of a [`Paged`]); panics when it still waits after [`HANG`].
fn join_in_time<T>(worker: std::thread::JoinHandle<T>) -> T {
    let deadline = Instant::now() + HANG;
    while !worker.is_finished() {
        assert!(Instant::now() < deadline, "a fault was never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    worker.join().expect("worker")
}

/// Whether a fault message waits on `uffd` within `wait`.
fn fault_pending(uffd: &Uffd, wait: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: uffd.raw(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, ms) > 0 }
}

#[test]
fn a_write_during_eviction_waits_and_is_not_lost() {
    let Some(mut t) = Served::new("a_write_during_eviction_waits_and_is_not_lost", 4, 4) else {
        return;
    };
    let page = t.ram.page(1);
    t.run(move || poke(page, 0, 0xA1));
    assert_eq!(t.state.page_at(page), Some(Page::Resident));

    // The eviction write-protects the page; a writer comes in before the copy and must wait
    // (its fault is pending on the userfaultfd, flagged as a write-protect fault).
    let mut writer = None;
    t.evict(page, |uffd| {
        writer = Some(std::thread::spawn(move || poke(page, 8, 0xB2)));
        assert!(
            fault_pending(uffd, Duration::from_secs(5)),
            "the write did not wait for the eviction"
        );
    });
    assert!(matches!(t.state.page_at(page), Some(Page::Swapped(_))));
    let writer = writer.expect("writer started");
    // Its fault is answered after the eviction: woken, it retries and the page comes back
    // from swap under its write.
    t.run(move || writer.join().expect("writer"));
    assert_eq!(t.state.counts.wp_faults, 1, "{:?}", t.state.counts);
    assert_eq!(t.state.counts.swap_ins, 1, "{:?}", t.state.counts);

    // Written, evicted, read back: both writes are there.
    t.evict(page, |_| {});
    let read = t.run(move || (peek(page, 0), peek(page, 8)));
    assert_eq!(read, (0xA1, 0xB2));
    assert_eq!(t.state.counts.swap_ins, 2);
    assert_eq!(t.state.swap().used(), 0, "every slot given back");
}

#[test]
fn a_failed_swap_in_keeps_the_page_in_its_slot() {
    let Some(mut t) = Served::new("a_failed_swap_in_keeps_the_page_in_its_slot", 2, 2) else {
        return;
    };
    let page = t.ram.page(0);
    t.run(move || poke(page, 0, 0xC3));
    t.evict(page, |_| {});
    let Some(Page::Swapped(slot)) = t.state.page_at(page) else {
        panic!("not swapped: {:?}", t.state.page_at(page));
    };
    // With the range no longer registered, the copy into it fails (as it can for a VM going
    // away): the page stays in its slot, twice over.
    t.set_registered(false);
    for attempt in 0..2 {
        assert!(t.state.resolve_missing(&t.uffd, page).is_err(), "{attempt}");
        assert_eq!(
            t.state.page_at(page),
            Some(Page::Swapped(slot)),
            "{attempt}"
        );
        assert_eq!(
            t.state.swap().used(),
            1,
            "attempt {attempt}: the slot is in use"
        );
    }
    // A slot freed twice would be handed to two pages: the next eviction gets another.
    t.set_registered(true);
    let other = t.ram.page(1);
    t.run(move || poke(other, 0, 0xD4));
    t.evict(other, |_| {});
    assert_ne!(t.state.page_at(other), Some(Page::Swapped(slot)));
    let read = t.run(move || (peek(page, 0), peek(other, 0)));
    assert_eq!(read, (0xC3, 0xD4));
}

/// A value no other (page, round) writes.
fn tag(page: usize, round: usize) -> u64 {
    u64::try_from((page << 20) | round).expect("tag") ^ 0x5a5a_0000_0000
}

#[test]
fn threads_writing_while_the_clock_evicts_lose_nothing() {
    const PAGES: usize = 64;
    const THREADS: usize = 4;
    const ROUNDS: usize = 12;
    const BUDGET_PAGES: usize = 8;
    let test = "threads_writing_while_the_clock_evicts_lose_nothing";
    let Some(uffd) = uffd_or_skip(test) else {
        return;
    };
    let swap = SwapFile::create(&swap_path(test), PAGES as u64).expect("swap file");
    let paged = Paged::new(uffd, BUDGET_PAGES, swap, PAGES);
    let start = paged.ram.start;
    // Each thread owns every THREADS-th page: it checks each page still holds what it wrote
    // the round before, then writes this round's tag at two places of the page.
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    for page in (t..PAGES).step_by(THREADS) {
                        let addr = start + page * PAGE;
                        let want = if round == 0 { 0 } else { tag(page, round - 1) };
                        assert_eq!(peek(addr, 0), want, "page {page} round {round}");
                        assert_eq!(peek(addr, PAGE - 8), want, "page {page} round {round}");
                        poke(addr, 0, tag(page, round));
                        poke(addr, PAGE - 8, tag(page, round));
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        join_in_time(worker);
    }
    let report = paged.pager.report();
    assert!(
        report.counts.swap_outs > PAGES as u64,
        "{:?}",
        report.counts
    );
    assert!(report.counts.swap_ins > PAGES as u64, "{:?}", report.counts);
    assert_eq!(report.peak_bytes, (BUDGET_PAGES * PAGE) as u64);
    assert!(!report.exhausted);
    assert_eq!(paged.ended.load(Ordering::SeqCst), 0);
}

#[test]
fn a_full_swap_file_ends_the_vms_once_and_loses_no_page() {
    const PAGES: usize = 16;
    const BUDGET_PAGES: usize = 4;
    const SLOTS: u64 = 4;
    let test = "a_full_swap_file_ends_the_vms_once_and_loses_no_page";
    let Some(uffd) = uffd_or_skip(test) else {
        return;
    };
    // Room for 4 resident and 4 swapped pages: the ninth page cannot be made room for.
    let swap = SwapFile::create(&swap_path(test), SLOTS)
        .expect("swap file")
        .without_growth();
    let paged = Paged::new(uffd, BUDGET_PAGES, swap, PAGES);
    let start = paged.ram.start;
    let worker = std::thread::spawn(move || {
        for page in 0..PAGES {
            poke(start + page * PAGE, 16, tag(page, 1));
        }
        (0..PAGES)
            .map(|page| peek(start + page * PAGE, 16))
            .collect::<Vec<u64>>()
    });
    let read = join_in_time(worker);
    let want: Vec<u64> = (0..PAGES).map(|page| tag(page, 1)).collect();
    assert_eq!(read, want, "a page came back wrong");
    assert!(paged.pager.exhausted());
    assert_eq!(
        paged.ended.load(Ordering::SeqCst),
        1,
        "the VMs are ended once"
    );
    let report = paged.pager.report();
    assert!(report.exhausted);
    assert_eq!(report.counts.swap_outs, SLOTS, "{:?}", report.counts);
    assert_eq!(
        report.peak_bytes,
        (PAGES * PAGE) as u64,
        "past the full swap, pages exceed the budget instead of waiting"
    );
}
