//! Which way enforces `--machine-mem` (`--pager cgroup|uffd`), set up before any VM is built:
//! the host kernel (a memory cgroup and swap, [`super::MachineBudget`]) or the VMM's own
//! userfaultfd pager ([`super::uffd::Pager`]). Both refuse what they cannot hold with one
//! [`BudgetError`] line (exit code [`super::EXIT_BUDGET_SETUP`]).
use std::path::Path;
use std::sync::Arc;

use super::uffd::{self, Pager, PagerReport};
use super::{BudgetArgs, BudgetError, BudgetReport, MachineBudget, PagerChoice, SwapChoice};

/// The running budget of the process.
pub enum ActiveBudget {
    /// Way (a): the host kernel.
    Kernel(MachineBudget),
    /// Way (b): the VMM's pager.
    Pager(Arc<Pager>),
}

/// What the budget did, for `--stats` (`machine_memory`).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(untagged)]
pub enum AnyBudgetReport {
    /// Way (a).
    Kernel(BudgetReport),
    /// Way (b).
    Pager(PagerReport),
}

impl AnyBudgetReport {
    /// The budget, bytes.
    pub fn budget_bytes(&self) -> u64 {
        match self {
            Self::Kernel(r) => r.budget_bytes,
            Self::Pager(r) => r.budget_bytes,
        }
    }

    /// Whether the budget ran out and the VMs were ended.
    pub fn exhausted(&self) -> bool {
        match self {
            Self::Kernel(r) => r.exhausted,
            Self::Pager(r) => r.exhausted,
        }
    }
}

/// What the VMs need from a budget.
pub struct Demand {
    /// Guest memory of all VMs, bytes.
    pub guest_bytes: u64,
    /// VMs.
    pub vms: usize,
    /// Whether any VM is a clone of a shared template (or a snapshot).
    pub template_clones: bool,
    /// Whether `--ksm` is on.
    pub ksm: bool,
}

impl ActiveBudget {
    /// Sets up the budget `args` asks for (none without `--machine-mem`).
    pub fn enter(args: &BudgetArgs, demand: &Demand) -> Result<Option<Self>, BudgetError> {
        let Some(budget) = args.machine_mem else {
            return Ok(None);
        };
        match args.pager {
            PagerChoice::Cgroup => {
                MachineBudget::enter(budget, &args.swap, demand.guest_bytes, demand.vms)
                    .map(|b| Some(Self::Kernel(b)))
            }
            PagerChoice::Uffd => {
                enter_pager(budget, &args.swap, demand).map(|p| Some(Self::Pager(p)))
            }
        }
    }

    /// Whether guest memory may be swapped by the host kernel (way (a) only: it then maps
    /// fresh guest memory privately).
    pub fn kernel_may_swap(&self) -> bool {
        matches!(self, Self::Kernel(b) if b.may_swap())
    }

    /// The pager, for the host context.
    pub fn pager(&self) -> Option<&Arc<Pager>> {
        match self {
            Self::Pager(p) => Some(p),
            Self::Kernel(_) => None,
        }
    }

    /// What the budget did so far.
    pub fn report(&self) -> AnyBudgetReport {
        match self {
            Self::Kernel(b) => AnyBudgetReport::Kernel(b.report()),
            Self::Pager(p) => AnyBudgetReport::Pager(p.report()),
        }
    }
}

fn enter_pager(budget: u64, swap: &SwapChoice, demand: &Demand) -> Result<Arc<Pager>, BudgetError> {
    let refuse = |why: &str| Err(BudgetError::Pager(why.to_string()));
    if demand.template_clones {
        return refuse("--pager uffd cannot page clones of a shared template (their template pages never fault to the pager); add --share none");
    }
    if demand.ksm {
        return refuse("--pager uffd cannot be combined with --ksm (merged pages are private copies the pager cannot evict)");
    }
    let min = uffd::PER_VM_MIN * demand.vms as u64;
    if budget < min {
        return Err(BudgetError::TooSmall {
            budget_mib: budget >> 20,
            vms: demand.vms,
            min_mib: min.div_ceil(1 << 20),
        });
    }
    let over = demand.guest_bytes.saturating_sub(budget);
    if *swap == SwapChoice::None && over > 0 {
        return Err(BudgetError::NoSwapDoesNotFit {
            guest_mib: demand.guest_bytes >> 20,
            budget_mib: budget >> 20,
            min_mib: demand.guest_bytes.div_ceil(1 << 20),
        });
    }
    uffd::remove_stale_swap_files();
    let path = match swap {
        SwapChoice::Path(p) => p.clone(),
        _ => uffd::default_swap_path(Path::new(uffd::DEFAULT_SWAP_DIR)),
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let free = super::swap::fs_free_bytes(dir).map_err(|e| BudgetError::SwapPath {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    // The whole overflow is reserved up front, so a swap-out only fails on a full disk when
    // the guests' memory grows past what they declared.
    let needed = over.saturating_add(super::KEEP_DISK_FREE);
    if free < needed {
        return Err(BudgetError::NoSwapSpace {
            dir: dir.to_path_buf(),
            needed_mib: needed >> 20,
            free_mib: free >> 20,
        });
    }
    // VMs whose whole memory fits can never need an eviction: nothing is registered.
    let paging = over > 0;
    Pager::start(budget, &path, over, paging).map_err(|e| BudgetError::Pager(e.to_string()))
}
