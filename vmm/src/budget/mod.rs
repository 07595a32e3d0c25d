//! The machine-memory budget (`--machine-mem SIZE`, `--swap auto|none|PATH`): the resident
//! memory of all VMs of one `vmm` process together is capped by the host kernel.
//!
//! - **What is charged**: the whole `vmm` process is moved into a memory cgroup of its own
//!   ([`cgroup`]) before any VM is built, so every page of guest memory (the memfd-backed shmem
//!   pages and the private copy-on-write pages of template clones, charged to the cgroup of the
//!   process that touches them first) *and* the VMM's own memory (its heap, KVM's page tables,
//!   about 10–20 MiB) count. Charging only the vCPU threads is not possible: memory cgroups charge
//!   a page to the cgroup of the faulting process's `mm`, not of the thread.
//! - **Swap**: pages over the budget are swapped out, so a swap area must exist ([`swap`]):
//!   `auto` uses the host's free swap when it is enough, else creates a swap file in `/var/tmp`
//!   (`O_EXCL`, mode 0600) sized for what does not fit; `PATH` uses (and, if absent, creates) that
//!   file; `none` requires every VM to fit.
//! - **Never an OOM kill**: on v1 the cgroup's OOM killer is off (threads wait instead) and on v2
//!   the limit is `memory.high` (reclaim and throttling) with `memory.max` a slack above it. A
//!   watchdog process forked before the VMM moves into the cgroup (so it never waits for memory
//!   itself) gives waiting tasks a breath (v1: the limit 4 MiB higher for a moment) while swap
//!   has room, and when swap is full at the limit for 3 s lifts the limit so stalled threads run
//!   on and sends the VMM SIGTERM to end the VMs: exit code [`EXIT_BUDGET_EXHAUSTED`].
//! - **Host state is restored** on every exit the process survives: normal end, error return,
//!   SIGINT/SIGTERM (they end the VMs and return normally) and panic (a panic hook; the build
//!   aborts on panic, so no destructors run). A process killed with SIGKILL leaves its cgroup
//!   and swap file; the next `vmm --machine-mem` removes them ([`remove_stale`]).
//!
//! - **No rseq**: a budgeted process runs without glibc's restartable sequences ([`rseq`]),
//!   whose per-thread kernel writes kill it with SIGSEGV when they hit a swapped-out page.
//!
//! Way (b), the VMM paging guest memory itself with userfaultfd (`--pager uffd`), is in
//! [`uffd`]; [`choice`] sets up whichever way the command line asks for.
//!
//! One budget per process: it is the process's by definition.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub mod cgroup;
pub mod choice;
pub mod rseq;
pub mod swap;
pub mod uffd;
mod watchdog;

use cgroup::BudgetCgroup;
use swap::OwnedSwap;

/// Exit code: the budget cannot be set up (too small, no root, no memory controller, no swap).
pub const EXIT_BUDGET_SETUP: i32 = 13;
/// Exit code: the budget ran out while the VMs ran (swap full); the VMs were ended.
pub const EXIT_BUDGET_EXHAUSTED: i32 = 14;

/// Memory the VMM itself needs inside the budget before any guest page.
pub const VMM_RESERVE: u64 = 24 << 20;
/// Memory each VM needs inside the budget to start (its image, page tables, KVM state).
pub const PER_VM_RESERVE: u64 = 4 << 20;
/// Space a created swap file leaves free on its file system.
pub(crate) const KEEP_DISK_FREE: u64 = 512 << 20;
/// Where `--swap auto` creates its file.
pub const AUTO_SWAP_DIR: &str = "/var/tmp";

/// The budget's command-line options (flattened into every command that runs VMs).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct BudgetArgs {
    /// Cap the resident memory of all VMs of this process together (e.g. 512M, 2G), enforced
    /// by a memory cgroup around the process (or, with --pager uffd, by the VMM itself); pages
    /// over it are swapped out (needs root).
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::parse_size)]
    pub machine_mem: Option<u64>,
    /// Where pages over --machine-mem go: auto (the host's free swap if enough, else a swap
    /// file in /var/tmp made for the run and deleted after), none (every VM must fit), or a
    /// swap file PATH (created for the run if it does not exist).
    #[arg(
        long,
        value_name = "auto|none|PATH",
        default_value = "auto",
        requires = "machine_mem"
    )]
    pub swap: SwapChoice,
    /// Who enforces --machine-mem: cgroup (the host kernel's reclaim and swap, the default) or
    /// uffd (the VMM pages guest memory itself with userfaultfd, a clock policy and a swap file
    /// of its own; needs --share none with several VMs).
    #[arg(
        long,
        value_name = "cgroup|uffd",
        default_value = "cgroup",
        requires = "machine_mem"
    )]
    pub pager: PagerChoice,
}

/// Who enforces the budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PagerChoice {
    /// The host kernel: a memory cgroup around the process, and swap.
    #[default]
    Cgroup,
    /// The VMM: userfaultfd on guest memory, its own clock eviction and swap file.
    Uffd,
}

/// Where pages over the budget go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SwapChoice {
    #[default]
    /// The host's free swap if it is enough, else a swap file this process creates.
    Auto,
    /// No swap: every VM must fit in the budget.
    None,
    /// This swap file (created if it does not exist).
    Path(PathBuf),
}

impl std::str::FromStr for SwapChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            "" => Err("--swap needs auto, none or a path".into()),
            path => Ok(Self::Path(PathBuf::from(path))),
        }
    }
}

/// Why the budget cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The budget cannot hold the VMs' start.
    #[error(
        "--machine-mem {budget_mib} MiB is too small to start {vms} VM(s): at least {min_mib} MiB"
    )]
    TooSmall {
        /// The budget.
        budget_mib: u64,
        /// VMs.
        vms: usize,
        /// The least that works.
        min_mib: u64,
    },
    /// `--swap none` with guests that do not fit.
    #[error("--swap none: the VMs' {guest_mib} MiB of guest memory do not fit in --machine-mem {budget_mib} MiB (at least {min_mib} MiB without swap)")]
    NoSwapDoesNotFit {
        /// Guest memory of all VMs.
        guest_mib: u64,
        /// The budget.
        budget_mib: u64,
        /// What fits without swap.
        min_mib: u64,
    },
    /// Not root (or no delegation).
    #[error("cannot create the memory cgroup {0} (needs root or a delegated cgroup)")]
    NotPermitted(PathBuf),
    /// No memory controller is mounted.
    #[error(
        "no cgroup memory controller is mounted (neither cgroup v2 with memory nor v1 memory)"
    )]
    NoMemoryController,
    /// Another cgroup step failed.
    #[error("memory cgroup: {what}: {source}")]
    Cgroup {
        /// The step.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not enough disk for the swap file.
    #[error("no space for a swap file in {dir}: needs {needed_mib} MiB free, {free_mib} MiB are")]
    NoSwapSpace {
        /// The directory.
        dir: PathBuf,
        /// Needed (with what is left free).
        needed_mib: u64,
        /// Free.
        free_mib: u64,
    },
    /// The swap file path is unusable.
    #[error("swap file {path}: {why}")]
    SwapPath {
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// `swapon` failed.
    #[error("cannot turn swap on for {path}: {source}")]
    Swapon {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Swap file sizes.
    #[error("the swap file would be larger than a swap header can describe")]
    SwapTooLarge,
    /// Swap file sizes.
    #[error("the swap file would be smaller than 10 pages")]
    SwapTooSmall,
    /// The userfaultfd pager cannot be set up or cannot hold these VMs.
    #[error("{0}")]
    Pager(String),
    /// A second budget in one process.
    #[error("this process already has a machine-memory budget")]
    AlreadyActive,
}

/// What the budget did, for `--stats` (`"machine_memory"`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BudgetReport {
    /// The budget in bytes.
    pub budget_bytes: u64,
    /// cgroup v1 or v2.
    pub cgroup: cgroup::Version,
    /// The cgroup directory.
    pub cgroup_dir: PathBuf,
    /// Highest charge: the kernel's peak (v1 `max_usage_in_bytes`, v2 `memory.peak`; the
    /// charge at the end where the kernel keeps none).
    pub peak_bytes: u64,
    /// The swap file set up for the run, if any.
    pub swap_file: Option<PathBuf>,
    /// Its size.
    pub swap_file_bytes: u64,
    /// Whether the budget ran out (swap full) and the VMs were ended.
    pub exhausted: bool,
}

struct Inner {
    cgroup: BudgetCgroup,
    swap: Option<OwnedSwap>,
}

impl Inner {
    fn release(&mut self) {
        // Out of the cgroup first: swapoff then reads pages back without the limit.
        self.cgroup.release();
        if let Some(swap) = &mut self.swap {
            swap.release();
        }
    }
}

/// The one active budget of the process, for the panic hook.
static ACTIVE: Mutex<Option<Arc<Mutex<Inner>>>> = Mutex::new(None);

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if let Ok(mut active) = ACTIVE.try_lock() {
                if let Some(inner) = active.take() {
                    if let Ok(mut inner) = inner.try_lock() {
                        inner.release();
                    }
                }
            }
        }));
    });
}

/// The running budget: dropping it restores the host.
pub struct MachineBudget {
    inner: Arc<Mutex<Inner>>,
    budget: u64,
    watchdog: Option<watchdog::Watchdog>,
    fits: bool,
}

/// The least budget that starts `vms` VMs.
pub fn minimum(vms: usize) -> u64 {
    VMM_RESERVE + PER_VM_RESERVE * vms as u64
}

/// Swap needed for `guest_bytes` of guest memory under `budget`, with a quarter as margin.
pub fn swap_needed(guest_bytes: u64, vms: usize, budget: u64) -> u64 {
    let over = (guest_bytes + minimum(vms)).saturating_sub(budget);
    let with_margin = over + over / 4;
    with_margin.max(64 << 20).div_ceil(1 << 20) << 20
}

/// `path` absolute with its directories resolved (the file itself may not exist yet).
fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(absolute.clone()),
        _ => absolute,
    }
}

/// Removes what processes killed with SIGKILL left behind: their cgroups and the swap files
/// `--swap auto` made for them.
pub fn remove_stale() {
    cgroup::remove_stale();
    for area in swap::active() {
        let Some(pid) = area
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("mirrorball-swap-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if area.path.parent() == Some(Path::new(AUTO_SWAP_DIR))
            && !Path::new(&format!("/proc/{pid}")).exists()
            && swap::swapoff(&area.path).is_ok()
        {
            let _ = std::fs::remove_file(&area.path);
        }
    }
}

impl MachineBudget {
    /// Sets the budget up for `vms` VMs with `guest_bytes` of guest memory together and moves
    /// this process under it. When the budget runs out, the watchdog lifts the limit and sends
    /// the process SIGTERM (whose handler ends the VMs); [`Self::exhausted`] then says so.
    pub fn enter(
        budget: u64,
        swap_choice: &SwapChoice,
        guest_bytes: u64,
        vms: usize,
    ) -> Result<Self, BudgetError> {
        let min = minimum(vms);
        if budget < min {
            return Err(BudgetError::TooSmall {
                budget_mib: budget >> 20,
                vms,
                min_mib: min.div_ceil(1 << 20),
            });
        }
        let fits = guest_bytes + min <= budget;
        if *swap_choice == SwapChoice::None && !fits {
            return Err(BudgetError::NoSwapDoesNotFit {
                guest_mib: guest_bytes >> 20,
                budget_mib: budget >> 20,
                min_mib: (guest_bytes + min).div_ceil(1 << 20),
            });
        }
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if active.is_some() {
            return Err(BudgetError::AlreadyActive);
        }
        remove_stale();
        let needed = swap_needed(guest_bytes, vms, budget);
        let swap = match swap_choice {
            SwapChoice::None => None,
            _ if fits => None,
            SwapChoice::Auto if swap::free_bytes() >= needed => None,
            SwapChoice::Auto => {
                let path = Path::new(AUTO_SWAP_DIR)
                    .join(format!("mirrorball-swap-{}-0", std::process::id()));
                Some(OwnedSwap::create(&path, needed, KEEP_DISK_FREE)?)
            }
            SwapChoice::Path(given) => {
                // As /proc/swaps names it: absolute, directories resolved.
                let path = resolve(given);
                if swap::active().iter().any(|a| a.path == path) {
                    None // already on: used as it is, and left on
                } else if path.exists() {
                    Some(OwnedSwap::existing(&path)?)
                } else {
                    Some(OwnedSwap::create(&path, needed, KEEP_DISK_FREE)?)
                }
            }
        };
        let slack = (budget / 16).max(16 << 20);
        let cgroup = BudgetCgroup::create(budget, slack)?;
        // Forked before the process moves in: the watchdog stays outside the budget, so it
        // still runs when every thread of the VMM waits for memory.
        let watchdog = watchdog::Watchdog::spawn(&cgroup, swap.as_ref().map(|s| s.size));
        // On an error, `cgroup`, `swap` and `watchdog` are dropped: the host is as before.
        cgroup.join()?;
        let inner = Arc::new(Mutex::new(Inner { cgroup, swap }));
        *active = Some(inner.clone());
        drop(active);
        install_panic_hook();
        Ok(Self {
            inner,
            budget,
            watchdog,
            fits,
        })
    }

    /// Whether the VMs' memory may be swapped: it does not all fit in the budget.
    pub fn may_swap(&self) -> bool {
        !self.fits
    }

    /// Whether the budget ran out while the VMs ran (the watchdog lifted the limit).
    pub fn exhausted(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cgroup
            .lifted()
    }

    /// What the budget did so far.
    pub fn report(&self) -> BudgetReport {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        BudgetReport {
            budget_bytes: self.budget,
            cgroup: inner.cgroup.version,
            cgroup_dir: inner.cgroup.dir.clone(),
            peak_bytes: inner
                .cgroup
                .kernel_peak()
                .unwrap_or_else(|| inner.cgroup.usage()),
            swap_file: inner.swap.as_ref().map(|s| s.path.clone()),
            swap_file_bytes: inner.swap.as_ref().map_or(0, |s| s.size),
            exhausted: inner.cgroup.lifted(),
        }
    }
}

impl Drop for MachineBudget {
    fn drop(&mut self) {
        drop(self.watchdog.take());
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release();
        *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_is_sized_for_what_does_not_fit() {
        let mib = 1u64 << 20;
        // 4 x 64 MiB under 128 MiB: 256 + 40 - 128 = 168 MiB over, + 25 % = 210 MiB.
        assert_eq!(swap_needed(256 * mib, 4, 128 * mib), 210 * mib);
        assert_eq!(swap_needed(16 * mib, 1, 512 * mib), 64 * mib);
        assert_eq!(minimum(2), 32 * mib);
    }

    #[test]
    fn swap_choices_parse() {
        assert_eq!("auto".parse::<SwapChoice>(), Ok(SwapChoice::Auto));
        assert_eq!("none".parse::<SwapChoice>(), Ok(SwapChoice::None));
        assert_eq!(
            "/var/tmp/s".parse::<SwapChoice>(),
            Ok(SwapChoice::Path("/var/tmp/s".into()))
        );
        assert!("".parse::<SwapChoice>().is_err());
    }
}
