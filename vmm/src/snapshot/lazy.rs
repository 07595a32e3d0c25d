//! Lazy restore (`vmm --restore DIR --lazy`): each clone's RAM is memory of its own, empty at the
//! start, and every page comes from the snapshot's memory file when the guest (or the VMM) first
//! touches it, through userfaultfd.
//!
//! - One [`LazyLoader`] per restored snapshot: one userfaultfd (missing-page mode) and one fault
//!   thread, holding its own descriptor of `memory.bin` (checked by the restore's `load`). Each
//!   clone's RAM mappings are registered with it ([`LazyLoader::register`]), with the offset of
//!   each mapping in the memory file (the RAM file's layout: ranges one after another).
//! - A fault reads the page with `pread` (a file that shrank under the restore gives zeroes and
//!   a counted read error, never a `SIGBUS`): a page with data is copied in (`UFFDIO_COPY`, a
//!   *load*), a page of zeroes (a hole) gets the zero page (`UFFDIO_ZEROPAGE`).
//! - Counted per VM ([`LazyCounts`], in its `memory.lazy` report) and per faulting thread: the
//!   profiler charges a vCPU thread's loads as host major faults (a page read from a file, like
//!   the budget pager's swap-ins) and its zero fills as minor ones: the kernel does not count a
//!   fault userfaultfd resolved for KVM's `get_user_pages` (a vCPU's guest access); it does
//!   count one taken by a user access (`copy_from_user`, e.g. PVM's instruction emulator) as a
//!   major fault of its own, which then shows twice.
//! - What it costs: the clones share nothing (each holds the pages it touched), where the default
//!   restore maps `memory.bin` copy-on-write and all clones share its page cache. What it gives:
//!   a restore that reads nothing up front and a count of exactly the pages each clone needed.
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::budget::uffd::sys::{self, Fill, Uffd};

const PAGE: usize = 4096;

/// What the loader did for one VM.
#[derive(Debug, Default)]
pub struct LazyCounts {
    loaded: AtomicU64,
    zeroed: AtomicU64,
    read_errors: AtomicU64,
}

/// [`LazyCounts`] read at one moment, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LazyFigures {
    /// Pages copied in from the memory file on first touch.
    pub loaded_pages: u64,
    /// Pages first touched where the file holds zeroes (holes), given the zero page.
    pub zero_pages: u64,
    /// Pages the file could not give (it shrank or failed to read), given zeroes.
    pub read_errors: u64,
}

impl LazyCounts {
    /// The counts now.
    pub fn figures(&self) -> LazyFigures {
        LazyFigures {
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
    /// Thread id → (loads, zero fills).
    per_thread: Mutex<HashMap<u32, (u64, u64)>>,
    stop: OwnedFd,
}

impl Shared {
    fn mappings(&self) -> std::sync::MutexGuard<'_, Vec<Mapping>> {
        self.mappings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fault thread of one restored snapshot, serving every clone registered with it.
pub struct LazyLoader {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
            per_thread: Mutex::new(HashMap::new()),
            stop: sys::stop_event()?,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lazy-restore".into())
            .spawn(move || {
                let mut page = vec![0u8; PAGE];
                sys::serve(&worker.uffd, worker.stop.as_raw_fd(), |msg| {
                    serve_fault(&worker, msg, &mut page)
                });
            })?;
        Ok(Arc::new(Self {
            shared,
            thread: Mutex::new(Some(thread)),
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

    /// The loader's faults per thread as the profiler takes them: (zero fills, loads), i.e.
    /// (minor, major) faults the kernel does not count for the faulting thread.
    pub fn fault_source(&self) -> crate::profiling::sampler::ThreadFaultSource {
        let shared = self.shared.clone();
        Arc::new(move |tid| {
            let map = shared.per_thread.lock().unwrap_or_else(|e| e.into_inner());
            u32::try_from(tid)
                .ok()
                .and_then(|t| map.get(&t))
                .map_or((0, 0), |&(loads, zeroes)| (zeroes, loads))
        })
    }

    /// The memory file the pages come from.
    pub fn source(&self) -> &File {
        &self.shared.source
    }
}

impl Drop for LazyLoader {
    fn drop(&mut self) {
        sys::signal(&self.shared.stop);
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
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
        self.loader.source()
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

/// Answers one missing-page fault from the memory file, `page` a scratch buffer of one page.
fn serve_fault(shared: &Shared, msg: &sys::FaultMsg, page: &mut [u8]) {
    let addr = usize::try_from(msg.address).unwrap_or(usize::MAX) & !(PAGE - 1);
    let found = shared.mappings().iter().find_map(|m| {
        let off = addr.checked_sub(m.start).filter(|&o| o < m.len)?;
        Some((m.file_offset + off as u64, m.counts.clone()))
    });
    let Some((offset, counts)) = found else {
        // Not (or no longer) registered: whoever waits retries.
        let _ = shared.uffd.wake(addr, PAGE);
        return;
    };
    let read = read_page(&shared.source, offset, page);
    if read.is_err() {
        counts.read_errors.fetch_add(1, Ordering::Relaxed);
        page.fill(0);
    }
    let zero = page.iter().all(|&b| b == 0);
    // Installed without waking the faulting thread: it goes on only once the page is counted.
    let filled = if zero {
        shared.uffd.zero_without_wake(addr, PAGE)
    } else {
        shared.uffd.copy_without_wake(addr, page)
    };
    if filled.is_ok_and(|f| f == Fill::Done) {
        let counter = if zero { &counts.zeroed } else { &counts.loaded };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut map = shared.per_thread.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(msg.tid).or_default();
        if zero {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }
    // Also when an earlier answer installed it, or the range went away.
    let _ = shared.uffd.wake(addr, PAGE);
}

/// Reads the page at `offset` into `page`; a short read (the file shrank) is an error.
fn read_page(source: &File, offset: u64, page: &mut [u8]) -> io::Result<()> {
    source.read_exact_at(page, offset)
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
                loaded_pages: data.len() as u64,
                zero_pages: (pages - data.len()) as u64,
                read_errors: 0
            }
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
        assert_eq!(registration.counts().figures().read_errors, 1);
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
        // The clone reads page 1, rewrites page 2 and writes page 5 (a hole); 300 and 400 are
        // never touched.
        let toucher = std::thread::spawn(move || {
            // SAFETY: the mapping outlives the thread (joined below).
            unsafe {
                let _ = std::ptr::read_volatile((start + PAGE) as *const u8);
                std::ptr::write_volatile((start + 2 * PAGE) as *mut u8, 0xee);
                std::ptr::write_volatile((start + 5 * PAGE) as *mut u8, 0x55);
            }
        });
        toucher.join().expect("toucher");
        let lazy = ram.lazy().expect("lazy").counts().figures();
        assert_eq!((lazy.loaded_pages, lazy.zero_pages), (2, 1), "{lazy:?}");
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
}
