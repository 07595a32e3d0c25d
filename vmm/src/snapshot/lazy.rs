//! Lazy restore (`vmm --restore DIR --lazy`): each clone's RAM is memory of its own, empty at the
//! start, and every page comes from the snapshot's memory file when the guest (or the VMM) first
//! touches it, through userfaultfd.
//!
//! - One [`LazyLoader`] per restored snapshot: one userfaultfd (missing-page mode) and one fault
//!   thread, holding its own descriptor of `memory.bin` (checked by the restore's `load`). Each
//!   clone's RAM mappings are registered with it ([`LazyLoader::register`]), with the offset of
//!   each mapping in the memory file (the RAM file's layout: ranges one after another).
//! - A fault brings in the 64 KiB block around the faulting page ([`BLOCK`]), read with
//!   `pread` (a file that shrank under the restore gives zeroes and counted read errors, never
//!   a `SIGBUS`) and installed with `UFFDIO_COPY` (zero pages for a block of zeroes), every page
//!   of it but those already there; the faulting thread is woken once the pages are counted.
//! - Counted per VM ([`LazyCounts`], in its `memory.lazy` report: faults, pages loaded, zero
//!   pages, read errors) and per faulting thread: the profiler charges a vCPU thread's faults
//!   that loaded data as host major faults (a read from a file, like the budget pager's
//!   swap-ins) and those that found only zeroes as minor ones. The kernel does not count a
//!   fault userfaultfd resolved for KVM's `get_user_pages` (a vCPU's guest access); it does
//!   count one taken by a user access (`copy_from_user`, e.g. PVM's instruction emulator) as a
//!   major fault of its own, which then shows twice.
//! - What it costs: the clones share nothing (each holds the pages it touched), where the default
//!   restore maps `memory.bin` copy-on-write and all clones share its page cache. What it gives:
//!   a restore that reads nothing up front, and counts of what each clone needed (the 64 KiB
//!   blocks it touched).
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::budget::uffd::sys::{self, Uffd};
use crate::budget::uffd::ThreadFaultCounts;

const PAGE: usize = 4096;
/// What one fault brings in: the 64 KiB block around the faulting page (16 pages, as the
/// kernel's fault-around maps from the page cache), so a guest that touches its memory in order
/// waits for one fault per block instead of one per page.
const BLOCK: usize = 16 * PAGE;
/// How long the fault thread looks for the next fault before it sleeps: a guest's first
/// touches come in bursts, and a sleep costs a wake-up per fault (measured here, 256 MiB read
/// in order: 376–403 µs per fault without, 135–231 µs with 50 µs).
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// What the loader did for one VM.
#[derive(Debug, Default)]
pub struct LazyCounts {
    faults: AtomicU64,
    loaded: AtomicU64,
    zeroed: AtomicU64,
    read_errors: AtomicU64,
}

/// [`LazyCounts`] read at one moment, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LazyFigures {
    /// First touches answered (each brings in the block around the page).
    pub faults: u64,
    /// Pages copied in from the memory file.
    pub loaded_pages: u64,
    /// Pages brought in where the file holds zeroes (holes), given zero pages.
    pub zero_pages: u64,
    /// Pages the file could not give (it shrank or failed to read), given zeroes.
    pub read_errors: u64,
}

impl LazyCounts {
    /// The counts now.
    pub fn figures(&self) -> LazyFigures {
        LazyFigures {
            faults: self.faults.load(Ordering::Relaxed),
            loaded_pages: self.loaded.load(Ordering::Relaxed),
            zero_pages: self.zeroed.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
        }
    }
}

/// One registered RAM mapping.
struct Mapping {
    start: usize,
    len: usize,
    file_offset: u64,
    counts: Arc<LazyCounts>,
}

struct Shared {
    uffd: Uffd,
    source: File,
    mappings: Mutex<Vec<Mapping>>,
    /// Per faulting thread: faults that loaded data (major), that found only zeroes (minor).
    per_thread: Arc<ThreadFaultCounts>,
}

impl Shared {
    fn mappings(&self) -> std::sync::MutexGuard<'_, Vec<Mapping>> {
        self.mappings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fault thread of one restored snapshot, serving every clone registered with it.
pub struct LazyLoader {
    shared: Arc<Shared>,
    _thread: sys::FaultThread,
}

impl std::fmt::Debug for LazyLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLoader").finish_non_exhaustive()
    }
}

impl LazyLoader {
    /// Starts a loader serving pages of `source` (the snapshot's memory file).
    pub fn start(source: File) -> io::Result<Arc<Self>> {
        let uffd =
            Uffd::open(sys::FEATURE_THREAD_ID | sys::FEATURE_MISSING_SHMEM).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "userfaultfd is not usable here ({e}); --lazy needs root \
                     (or vm.unprivileged_userfaultfd=1)"
                    ),
                )
            })?;
        let shared = Arc::new(Shared {
            uffd,
            source,
            mappings: Mutex::new(Vec::new()),
            per_thread: Arc::default(),
        });
        let worker = shared.clone();
        let thread = sys::FaultThread::spawn("lazy-restore", move |stop| {
            let mut block = vec![0u8; BLOCK];
            sys::serve(&worker.uffd, stop, SPIN, |msg| {
                serve_fault(&worker, msg, &mut block)
            });
        })?;
        Ok(Arc::new(Self {
            shared,
            _thread: thread,
        }))
    }

    /// Registers one VM's RAM mappings (host start, length), laid out one after another in the
    /// memory file; none of their pages may be present yet.
    pub fn register(self: &Arc<Self>, ranges: &[(usize, usize)]) -> io::Result<LazyRegistration> {
        let counts = Arc::new(LazyCounts::default());
        let mut registration = LazyRegistration {
            loader: self.clone(),
            ranges: Vec::new(),
            counts: counts.clone(),
        };
        let mut file_offset = 0u64;
        for &(start, len) in ranges {
            // Known to the fault thread before any fault can come.
            self.shared.mappings().push(Mapping {
                start,
                len,
                file_offset,
                counts: counts.clone(),
            });
            registration.ranges.push((start, len));
            self.shared.uffd.register_missing(start, len)?;
            file_offset += len as u64;
        }
        Ok(registration)
    }

    /// The loader's faults per thread as the profiler takes them: (faults that found only
    /// zeroes, faults that loaded data), i.e. (minor, major) faults.
    pub fn fault_source(&self) -> crate::profiling::sampler::ThreadFaultSource {
        self.shared.per_thread.source()
    }
}

/// One VM's RAM under a loader; dropping it (before the mapping goes away) unregisters it.
pub struct LazyRegistration {
    loader: Arc<LazyLoader>,
    ranges: Vec<(usize, usize)>,
    counts: Arc<LazyCounts>,
}

impl std::fmt::Debug for LazyRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRegistration")
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl LazyRegistration {
    /// The VM's counts.
    pub fn counts(&self) -> Arc<LazyCounts> {
        self.counts.clone()
    }

    /// The memory file the VM's pages not yet loaded are in.
    pub fn source(&self) -> &File {
        &self.loader.shared.source
    }
}

impl Drop for LazyRegistration {
    fn drop(&mut self) {
        let shared = &self.loader.shared;
        for &(start, len) in &self.ranges {
            // Threads waiting on a fault in the range are woken by the kernel and retry.
            let _ = shared.uffd.unregister(start, len);
        }
        shared
            .mappings()
            .retain(|m| !self.ranges.contains(&(m.start, m.len)));
    }
}

/// Answers one missing-page fault from the memory file with the block around it, `buf` a
/// scratch buffer of one block.
fn serve_fault(shared: &Shared, msg: &sys::FaultMsg, buf: &mut [u8]) {
    let addr = usize::try_from(msg.address).unwrap_or(usize::MAX) & !(PAGE - 1);
    let found = shared.mappings().iter().find_map(|m| {
        let off = addr.checked_sub(m.start).filter(|&o| o < m.len)?;
        let block = off / BLOCK * BLOCK;
        let len = BLOCK.min(m.len - block);
        Some((
            m.start + block,
            len,
            m.file_offset + block as u64,
            m.counts.clone(),
        ))
    });
    let Some((start, len, offset, counts)) = found else {
        // Not (or no longer) registered: whoever waits retries.
        let _ = shared.uffd.wake(addr, PAGE);
        return;
    };
    let block = &mut buf[..len];
    let read = read_block(&shared.source, offset, block);
    if read < len {
        counts
            .read_errors
            .fetch_add(((len - read) / PAGE) as u64, Ordering::Relaxed);
    }
    let (loaded, zeroed) = install(&shared.uffd, start, block);
    counts.loaded.fetch_add(loaded, Ordering::Relaxed);
    counts.zeroed.fetch_add(zeroed, Ordering::Relaxed);
    if loaded + zeroed > 0 {
        counts.faults.fetch_add(1, Ordering::Relaxed);
        shared.per_thread.add(msg.tid, loaded > 0);
    }
    // Only now, the pages counted: also when an earlier answer had installed them, or the
    // range went away.
    let _ = shared.uffd.wake(start, len);
}

/// Installs `block` at `start` (without waking anyone), every page but those already there;
/// returns the (non-zero, zero) pages installed. A block of zeroes gets zero pages.
fn install(uffd: &Uffd, start: usize, block: &[u8]) -> (u64, u64) {
    let all_zero = block.iter().all(|&b| b == 0);
    let (mut loaded, mut zeroed) = (0u64, 0u64);
    let mut at = 0;
    while at < block.len() {
        let done = if all_zero {
            uffd.zero_until_present(start + at, block.len() - at)
        } else {
            uffd.copy_until_present(start + at, &block[at..])
        };
        match done {
            Ok(0) => at += PAGE, // That page is there already.
            Ok(n) => {
                let n = n.min(block.len() - at) / PAGE * PAGE;
                for page in block[at..at + n].chunks(PAGE) {
                    if page.iter().all(|&b| b == 0) {
                        zeroed += 1;
                    } else {
                        loaded += 1;
                    }
                }
                at += n.max(PAGE);
            }
            Err(_) => break, // The range went away (the VM ended).
        }
    }
    (loaded, zeroed)
}

/// Reads the block at `offset` into `block`; returns the bytes read, the rest zeroed (the
/// file shrank, or a read failed).
fn read_block(source: &File, offset: u64, block: &mut [u8]) -> usize {
    let mut read = 0;
    while read < block.len() {
        match source.read_at(&mut block[read..], offset + read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let whole = read / PAGE * PAGE;
    block[whole..].fill(0);
    whole
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;
    use std::os::unix::fs::FileExt;

    fn uffd_usable(test: &str) -> bool {
        match Uffd::open(sys::FEATURE_THREAD_ID | sys::FEATURE_MISSING_SHMEM) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipping {test}: userfaultfd is not usable here: {e}");
                false
            }
        }
    }

    /// The first bytes of page `i` of a test file: never zero.
    fn mark(i: usize) -> u8 {
        u8::try_from(i % 250 + 1).unwrap_or(1)
    }

    /// A memory file of `pages` pages whose page `i` (for `i` in `data`) starts with `mark(i)`.
    fn source(pages: usize, data: &[usize]) -> File {
        let file = tempfile_in_tmp();
        file.set_len((pages * PAGE) as u64).expect("size");
        for &i in data {
            file.write_all_at(&[mark(i); 16], (i * PAGE) as u64)
                .expect("write");
        }
        file
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!(
            "mb-lazy-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("temp file");
        let _ = std::fs::remove_file(&path);
        file
    }

    #[test]
    fn pages_come_from_the_file_on_first_touch_and_are_counted() {
        if !uffd_usable("pages_come_from_the_file_on_first_touch_and_are_counted") {
            return;
        }
        let pages = 512; // 2 MiB, the smallest guest RAM.
        let data = [0, 3, 200, 511];
        let loader = LazyLoader::start(source(pages, &data)).expect("loader");
        let ram = GuestRam::new((pages * PAGE) as u64).expect("ram");
        let (start, len) = ram.host_ranges()[0];
        assert_eq!(len, pages * PAGE);
        let registration = loader.register(&ram.host_ranges()).expect("register");
        // Touched from another thread (as a vCPU would), every page once.
        let toucher = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below); reads only.
            (0..pages)
                .map(|i| unsafe { std::ptr::read_volatile((start + i * PAGE) as *const u8) })
                .collect::<Vec<u8>>()
        });
        let firsts = toucher.join().expect("toucher");
        for (i, &b) in firsts.iter().enumerate() {
            let want = if data.contains(&i) { mark(i) } else { 0 };
            assert_eq!(b, want, "page {i}");
        }
        let figures = registration.counts().figures();
        assert_eq!(
            figures,
            LazyFigures {
                faults: (pages / 16) as u64,
                loaded_pages: data.len() as u64,
                zero_pages: (pages - data.len()) as u64,
                read_errors: 0
            },
            "one fault per 64 KiB block"
        );
        // Touched again: no more faults.
        // SAFETY: reads inside the live mapping.
        let again = unsafe { std::ptr::read_volatile((start + 3 * PAGE) as *const u8) };
        assert_eq!(again, mark(3));
        assert_eq!(registration.counts().figures(), figures);
        drop(registration);
        drop(ram);
    }

    #[test]
    fn a_file_that_shrank_gives_zeroes_and_counts_read_errors() {
        if !uffd_usable("a_file_that_shrank_gives_zeroes_and_counts_read_errors") {
            return;
        }
        let pages = 512;
        let file = source(pages, &[500]);
        let shrink = file.try_clone().expect("clone");
        let loader = LazyLoader::start(file).expect("loader");
        let ram = GuestRam::new((pages * PAGE) as u64).expect("ram");
        let (start, _) = ram.host_ranges()[0];
        let registration = loader.register(&ram.host_ranges()).expect("register");
        shrink.set_len(100 * PAGE as u64).expect("shrink");
        let toucher = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below); reads only.
            unsafe { std::ptr::read_volatile((start + 500 * PAGE) as *const u8) }
        });
        assert_eq!(toucher.join().expect("toucher"), 0);
        let figures = registration.counts().figures();
        assert_eq!(
            (figures.faults, figures.read_errors),
            (1, 16),
            "{figures:?}"
        );
    }

    #[test]
    fn a_snapshot_of_a_lazy_clone_keeps_the_pages_it_never_loaded() {
        if !uffd_usable("a_snapshot_of_a_lazy_clone_keeps_the_pages_it_never_loaded") {
            return;
        }
        let pages = 512;
        let data = [1, 2, 300, 400];
        let loader = LazyLoader::start(source(pages, &data)).expect("loader");
        let mut ram = GuestRam::new((pages * PAGE) as u64).expect("ram");
        ram.attach_lazy(&loader).expect("register");
        let (start, _) = ram.host_ranges()[0];
        // The clone reads page 1, rewrites page 2 and writes page 5 (a hole); the blocks of
        // 300 and 400 are never touched.
        let toucher = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below).
            unsafe {
                let _ = std::ptr::read_volatile((start + PAGE) as *const u8);
                std::ptr::write_volatile((start + 2 * PAGE) as *mut u8, 0xee);
                std::ptr::write_volatile((start + 5 * PAGE) as *mut u8, 0x55);
            }
        });
        toucher.join().expect("toucher");
        // One fault: the block of pages 0-15.
        let lazy = ram.lazy().expect("lazy").counts().figures();
        assert_eq!(
            (lazy.faults, lazy.loaded_pages, lazy.zero_pages),
            (1, 2, 14),
            "{lazy:?}"
        );
        let out = tempfile_in_tmp();
        let written = crate::snapshot::memory::write(&ram, &out).expect("write");
        assert_eq!(
            written.pages, 5,
            "pages 1, 2, 5 from RAM, 300 and 400 from the source"
        );
        assert_eq!(
            crate::snapshot::memory::verify(&out, (pages * PAGE) as u64).expect("verify"),
            written
        );
        let first = |i: usize| {
            let mut b = [0u8; 2];
            out.read_exact_at(&mut b, (i * PAGE) as u64).expect("read");
            b
        };
        assert_eq!(first(1), [mark(1); 2]);
        assert_eq!(first(2), [0xee, mark(2)]);
        assert_eq!(first(5), [0x55, 0]);
        assert_eq!(first(300), [mark(300); 2]);
        assert_eq!(first(400), [mark(400); 2]);
        assert_eq!(first(7), [0, 0]);
        // Writing the snapshot loaded nothing.
        assert_eq!(ram.lazy().expect("lazy").counts().figures(), lazy);
    }

    #[test]
    fn a_block_is_installed_around_the_pages_already_there() {
        if !uffd_usable("a_block_is_installed_around_the_pages_already_there") {
            return;
        }
        let uffd = Uffd::open(sys::FEATURE_THREAD_ID | sys::FEATURE_MISSING_SHMEM).expect("uffd");
        let ram = GuestRam::new(2 << 20).expect("ram");
        let (start, len) = ram.host_ranges()[0];
        uffd.register_missing(start, len).expect("register");
        // Page 3 is there first (another answer), holding 0x33.
        let mut page = vec![0x33u8; PAGE];
        assert_eq!(
            uffd.copy(start + 3 * PAGE, &page).expect("copy"),
            sys::Fill::Done
        );
        // A block whose pages 0 and 3 hold data, the others zeroes.
        let mut block = vec![0u8; BLOCK];
        block[0] = 0x10;
        block[3 * PAGE] = 0x11;
        assert_eq!(install(&uffd, start, &block), (1, 14), "all but page 3");
        // A block of zeroes whose page 3 is there: zero pages around it.
        assert_eq!(
            install(&uffd, start, &vec![0u8; BLOCK]),
            (0, 0),
            "all there now"
        );
        let next = start + BLOCK;
        page.fill(0x44);
        assert_eq!(
            uffd.copy(next + 15 * PAGE, &page).expect("copy"),
            sys::Fill::Done
        );
        assert_eq!(install(&uffd, next, &vec![0u8; BLOCK]), (0, 15));
        // SAFETY: reads inside the registered mapping, every page of which is installed.
        let read = |addr: usize| unsafe { std::ptr::read_volatile(addr as *const u8) };
        assert_eq!(
            (read(start), read(start + 3 * PAGE), read(next + 15 * PAGE)),
            (0x10, 0x33, 0x44)
        );
        uffd.unregister(start, len).expect("unregister");
    }
}
