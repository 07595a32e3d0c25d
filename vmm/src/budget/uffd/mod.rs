//! Way (b) of the machine-memory budget (`--machine-mem SIZE --pager uffd`): the VMM pages guest
//! memory itself, Disco-style, instead of leaving it to the host kernel's cgroup and swap.
//!
//! - Every VM's RAM (a shared memfd mapping) is registered with one userfaultfd of the process
//!   ([`sys`]) in missing-page and write-protect mode. One fault thread per process
//!   ([`Pager`]) answers every fault: a first touch gets a zeroed page, a page evicted earlier is
//!   read back from the pager's own swap file ([`swapfile`]). The faulting vCPU waits for its own
//!   fault only; evictions happen on the fault thread.
//! - The budget counts the resident guest pages of all VMs of the process together (not the
//!   VMM's heap). Before a page comes in over it, the clock ([`clock`]) evicts one: second
//!   chance, with the host page-table entry as the reference bit.
//! - Every fault arrives with the faulting thread's id, so each swap-in (a major fault) is known
//!   per thread: [`Pager::faults_of`] gives the vCPU thread's, which the profiler charges to
//!   the VM, the vCPU and the guest task running, like the kernel's major faults in way (a).
//! - Template sharing cannot coexist: a clone's template pages are file pages the kernel
//!   faults in without the pager, and evicting a clone's private copy would bring back the
//!   template's contents. `--pager uffd` needs memory of its own per VM (`--share none`).
//!
//! Nothing here is process-global: the pager hangs off the process's `HostContext`.
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod clock;
pub mod swapfile;
pub mod sys;
#[cfg(test)]
mod tests;

use clock::{PagerCounts, PagerState, Resolved};
use swapfile::SwapFile;
use sys::Uffd;

use crate::arch::x86_64::layout::PAGE_SIZE;

/// Where the swap file goes by default: a disk, not the run directory (tmpfs, i.e. RAM).
pub const DEFAULT_SWAP_DIR: &str = "/var/tmp";
/// Resident guest pages each VM needs at least (its page tables, code and a working set).
pub const PER_VM_MIN: u64 = 4 << 20;

/// Why the pager cannot start or take a VM.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// The kernel has no userfaultfd or lacks a feature the pager needs.
    #[error("userfaultfd is not usable here ({0}); it needs root (or vm.unprivileged_userfaultfd=1) and shmem missing-page and write-protect support")]
    Unsupported(io::Error),
    /// The swap file cannot be made.
    #[error("cannot create the pager's swap file {path}: {source}")]
    SwapFile {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Registering a VM's memory failed.
    #[error("cannot register guest memory with userfaultfd: {0}")]
    Register(io::Error),
    /// Clones of a template cannot be paged (see the module docs).
    #[error("--pager uffd cannot page clones of a shared template; add --share none")]
    TemplateSharing,
    /// A lazily restored VM's pages come through a userfaultfd of their own.
    #[error("--pager uffd cannot page a lazily restored VM; drop --lazy or use --pager cgroup")]
    LazyRestore,
    /// The fault thread cannot start.
    #[error("cannot start the fault thread: {0}")]
    Thread(io::Error),
}

/// Faults the pager resolved for one thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ThreadFaults {
    /// Pages read back from swap (major faults).
    pub swap_ins: u64,
    /// First touches answered with zeroes.
    pub zero_fills: u64,
}

/// What the pager did, for `--stats` (`machine_memory`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PagerReport {
    /// "uffd".
    pub pager: &'static str,
    /// The budget in bytes.
    pub budget_bytes: u64,
    /// The highest resident guest memory, bytes.
    pub peak_bytes: u64,
    /// The swap file.
    pub swap_file: PathBuf,
    /// Bytes reserved in it.
    pub swap_file_bytes: u64,
    /// The counters.
    pub counts: PagerCounts,
    /// Whether the swap file filled up and the VMs were ended.
    pub exhausted: bool,
    /// Whether guest memory was registered: not when the VMs' whole memory fits the budget
    /// (nothing could ever be evicted, so no fault goes through the pager).
    pub paging: bool,
}

/// The faults a fault thread resolved, per faulting thread, as the profiler charges them.
#[derive(Debug, Default)]
pub struct ThreadFaultCounts(Mutex<HashMap<u32, (u64, u64)>>);

impl ThreadFaultCounts {
    /// One more fault of thread `tid`, a major one or a minor one.
    pub fn add(&self, tid: u32, major: bool) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(tid).or_default();
        if major {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }

    /// Thread `tid`'s (minor, major) faults so far.
    pub fn of(&self, tid: i32) -> (u64, u64) {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        u32::try_from(tid)
            .ok()
            .and_then(|t| map.get(&t).copied())
            .unwrap_or_default()
    }

    /// The counts as a source the profiler adds to the kernel's per-thread ones.
    pub fn source(self: &Arc<Self>) -> crate::profiling::sampler::ThreadFaultSource {
        let counts = self.clone();
        Arc::new(move |tid| counts.of(tid))
    }
}

struct Shared {
    uffd: Uffd,
    state: Mutex<PagerState>,
    per_thread: Arc<ThreadFaultCounts>,
    exhausted: AtomicBool,
    /// Ends the VMs once the swap file is full (the process's SIGTERM handler does).
    on_exhausted: EndVms,
}

/// What the fault thread does, once, when the swap file fills up.
type EndVms = Box<dyn Fn() + Send + Sync>;

/// Sends this process SIGTERM, whose handler ends every VM.
fn sigterm_self() {
    // SAFETY: sends a signal to this process; no memory is involved.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

/// The process's pager: the userfaultfd, the fault thread, the clock and the swap file.
pub struct Pager {
    shared: Arc<Shared>,
    budget: u64,
    paging: bool,
    _thread: sys::FaultThread,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("budget", &self.budget)
            .finish()
    }
}

/// The swap file of a pager for `pid`, in `dir`.
pub fn default_swap_path(dir: &Path) -> PathBuf {
    dir.join(format!("mirrorball-uffd-swap-{}", std::process::id()))
}

/// Removes the default-place swap files of pagers whose process is gone (killed by a signal
/// that ran no destructors); a file the user named is theirs to remove.
pub fn remove_stale_swap_files() {
    let Ok(entries) = std::fs::read_dir(DEFAULT_SWAP_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mirrorball-uffd-swap-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Pager {
    /// Starts a pager holding at most `budget` bytes of guest memory resident, paging to a new
    /// swap file at `swap_path` with room for `swap_bytes` reserved. Without `paging` (the
    /// VMs' memory fits the budget) it registers nothing.
    pub fn start(
        budget: u64,
        swap_path: &Path,
        swap_bytes: u64,
        paging: bool,
    ) -> Result<Arc<Self>, PagerError> {
        let uffd =
            Uffd::open(sys::FEATURE_THREAD_ID | sys::FEATURE_MISSING_SHMEM | sys::FEATURE_WP_SHMEM)
                .map_err(PagerError::Unsupported)?;
        let swap =
            SwapFile::create(swap_path, swap_bytes.div_ceil(PAGE_SIZE)).map_err(|source| {
                PagerError::SwapFile {
                    path: swap_path.to_path_buf(),
                    source,
                }
            })?;
        Self::start_with(uffd, budget, swap, paging, Box::new(sigterm_self))
    }

    /// [`Self::start`] with its userfaultfd and swap file made, and what ends the VMs when
    /// the swap file is full (a seam for tests, which cannot take the SIGTERM).
    fn start_with(
        uffd: Uffd,
        budget: u64,
        swap: SwapFile,
        paging: bool,
        on_exhausted: EndVms,
    ) -> Result<Arc<Self>, PagerError> {
        let state = PagerState::new(budget / PAGE_SIZE, swap).map_err(PagerError::Thread)?;
        let shared = Arc::new(Shared {
            uffd,
            state: Mutex::new(state),
            per_thread: Arc::default(),
            exhausted: AtomicBool::new(false),
            on_exhausted,
        });
        let worker = shared.clone();
        let thread = sys::FaultThread::spawn("uffd-pager", move |stop| fault_loop(&worker, stop))
            .map_err(PagerError::Thread)?;
        Ok(Arc::new(Self {
            shared,
            budget,
            paging,
            _thread: thread,
        }))
    }

    /// Registers one VM's RAM mappings (host start, length); their pages already in memory
    /// count against the budget from now on. Dropping the registration forgets them.
    pub fn register(
        self: &Arc<Self>,
        ranges: &[(usize, usize)],
    ) -> Result<Registration, PagerError> {
        let mut registration = Registration {
            pager: self.clone(),
            ranges: Vec::new(),
        };
        if !self.paging {
            return Ok(registration);
        }
        for &(start, len) in ranges {
            let resident = resident_pages(start, len).map_err(PagerError::Register)?;
            self.shared
                .uffd
                .register(start, len)
                .map_err(PagerError::Register)?;
            let mut state = self.lock();
            let id = state
                .add_range(&self.shared.uffd, start, &resident)
                .map_err(PagerError::Register)?;
            registration.ranges.push((id, start, len));
        }
        Ok(registration)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PagerState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Faults the pager resolved for thread `tid` so far.
    pub fn faults_of(&self, tid: i32) -> ThreadFaults {
        let (zero_fills, swap_ins) = self.shared.per_thread.of(tid);
        ThreadFaults {
            swap_ins,
            zero_fills,
        }
    }

    /// The pager's faults per thread as the profiler takes them: (zero fills, swap-ins), i.e.
    /// (minor, major) faults the kernel does not count for the faulting thread.
    pub fn fault_source(self: &Arc<Self>) -> crate::profiling::sampler::ThreadFaultSource {
        self.shared.per_thread.source()
    }

    /// Whether the swap file filled up (the VMs were sent SIGTERM).
    pub fn exhausted(&self) -> bool {
        self.shared.exhausted.load(Ordering::Acquire)
    }

    /// What the pager did so far.
    pub fn report(&self) -> PagerReport {
        let state = self.lock();
        PagerReport {
            pager: "uffd",
            budget_bytes: self.budget,
            peak_bytes: state.counts.peak_resident_pages * PAGE_SIZE,
            swap_file: state.swap().path().to_path_buf(),
            swap_file_bytes: state.swap().reserved_bytes(),
            counts: state.counts,
            exhausted: self.exhausted(),
            paging: self.paging,
        }
    }
}

/// One VM's RAM under the pager; dropping it (before the mapping goes away) forgets the pages.
pub struct Registration {
    pager: Arc<Pager>,
    ranges: Vec<(usize, usize, usize)>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.pager.lock();
        for &(id, start, len) in &self.ranges {
            state.remove_range(id);
            let _ = self.pager.shared.uffd.unregister(start, len);
        }
    }
}

/// Which pages of `[start, start+len)` are in memory (`mincore`; for a shared memfd mapping,
/// whether the page is in the file).
fn resident_pages(start: usize, len: usize) -> io::Result<Vec<bool>> {
    let pages = len / clock::PAGE;
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range, which is a live mapping of the caller.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

/// The fault thread: waits for faults or the stop signal, resolves every fault at once.
fn fault_loop(shared: &Shared, stop: RawFd) {
    sys::serve(&shared.uffd, stop, Duration::ZERO, |msg| {
        handle_fault(shared, msg)
    });
}

fn handle_fault(shared: &Shared, msg: &sys::FaultMsg) {
    let addr = usize::try_from(msg.address).unwrap_or(usize::MAX);
    let page = addr & !(clock::PAGE - 1);
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let result = if msg.flags & sys::PAGEFAULT_FLAG_WP != 0 {
        state
            .resolve_write_protect(&shared.uffd, page)
            .map(|()| None)
    } else {
        state.resolve_missing(&shared.uffd, page).map(Some)
    };
    match result {
        Ok(Some(resolved)) => {
            drop(state);
            if resolved != Resolved::Woken {
                shared.per_thread.add(msg.tid, resolved == Resolved::SwapIn);
            }
        }
        Ok(None) => {}
        Err(_) => {
            // The swap file is full (or unwritable): let pages exceed the budget from now on so
            // no vCPU waits forever, and end the VMs the way SIGTERM does (exit code 14).
            state.overcommit = true;
            let retry = state.resolve_missing(&shared.uffd, page);
            drop(state);
            if retry.is_err() {
                let _ = shared.uffd.wake(page, clock::PAGE);
            }
            if !shared.exhausted.swap(true, Ordering::AcqRel) {
                (shared.on_exhausted)();
            }
        }
    }
}
