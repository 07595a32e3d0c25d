//! Profiler regions as files: `vm-<pid>-<n>.guest` (the guest writes it; mapped into guest
//! memory), `vm-<pid>-<n>.host` (only the VMM writes it; never guest-mapped) and
//! `vm-<pid>-<n>.json` (metadata), in the run directory (default `/dev/shm/mirrorball`, or
//! `MIRRORBALL_RUN_DIR`). Files are mode 0600 and removed when the VM's regions are dropped.
//!
//! The protocol itself (safe creation, the private run directory, the lock that marks a VM
//! live, the sweep of stale sets) is `mirrorball_monitor::{rundir, publish}`, shared with the
//! readers; this module only sizes the regions and names the VM.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::sizing::RegionSizing;
use mirrorball_monitor::publish::{PublishSpec, PublishedVm};
use mirrorball_profiler_abi::{GuestRegionLayout, HostRegionLayout, Region, RegionMut};

pub use mirrorball_monitor::rundir::{DEFAULT_RUN_DIR, RUN_DIR_ENV};

/// Errors publishing regions.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// A file operation failed.
    #[error("profiler region {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Publishing in the run directory failed (the error names the file or directory).
    #[error("cannot publish the profiler regions: {0}")]
    Publish(std::io::Error),
    /// The ABI refused the layout.
    #[error("profiler region layout: {0:?}")]
    Abi(mirrorball_profiler_abi::AbiError),
    /// A count does not fit the ABI's fields.
    #[error("profiler region layout: {0}")]
    Count(String),
}

/// What the profiler regions of one VM are published for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionRequest {
    /// The VM's name (shown by the tools).
    pub vm_name: String,
    /// "linux" or "workload".
    pub kind: &'static str,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest tasks, when the VMM knows them (the regions are then sized from the run).
    pub tasks: Option<usize>,
    /// Sampling period.
    pub period: std::time::Duration,
}

/// The run directory: `MIRRORBALL_RUN_DIR` or [`DEFAULT_RUN_DIR`].
pub fn run_dir() -> PathBuf {
    mirrorball_monitor::resolve_run_dir(None)
}

/// Which of a VM's two regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Guest,
    Host,
}

/// One published region file, mapped shared and writable; the files are removed (and the
/// mappings unmapped) when the last handle of the VM's regions is dropped.
pub struct RegionFile {
    vm: Arc<PublishedVm>,
    kind: Kind,
}

impl RegionFile {
    /// The file's path.
    pub fn path(&self) -> PathBuf {
        match self.kind {
            Kind::Guest => self.vm.guest_path(),
            Kind::Host => self.vm.host_path(),
        }
    }

    /// Host address of the mapping (the guest region only: the host region is never
    /// guest-mapped, and its address is not handed out).
    pub fn host_addr(&self) -> *mut u8 {
        match self.kind {
            Kind::Guest => self.vm.guest_mapping().0,
            Kind::Host => std::ptr::null_mut(),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.region_mut().map_or(0, |r| r.len())
    }

    /// Whether the mapping is empty (never: regions have headers).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mapping for the ABI crate's writers.
    pub fn region_mut(&self) -> Result<RegionMut<'_>, RegionError> {
        let region = match self.kind {
            Kind::Guest => self.vm.guest_region_mut(),
            Kind::Host => self.vm.host_region_mut(),
        };
        region.map_err(|source| RegionError::Io {
            path: self.path(),
            source,
        })
    }

    /// The mapping for the ABI crate's readers.
    pub fn region(&self) -> Result<Region<'_>, RegionError> {
        Ok(self.region_mut()?.as_region())
    }
}

/// The two regions (and metadata file) of one VM, published through the run-directory
/// protocol's one implementation ([`mirrorball_monitor::publish`]).
pub struct ProfilerRegions {
    /// Guest-writable region.
    pub guest: RegionFile,
    /// Host-only region.
    pub host: RegionFile,
    /// `vm-<pid>-<n>`.
    pub name: String,
    /// `pid << 32 | n`: names the pair of regions (the device reports it to the guest).
    pub id: u64,
    /// Initial sample period, ns.
    pub period_ns: u64,
}

static NEXT_VM: AtomicU32 = AtomicU32::new(0);

impl ProfilerRegions {
    /// Creates and formats both regions for `vcpus` vCPUs in `dir`, sized for any number of
    /// guest tasks (see [`RegionSizing`]).
    pub fn create(
        dir: &Path,
        vcpus: u32,
        guest_kind: &str,
        period_ns: u64,
    ) -> Result<Self, RegionError> {
        let sizing = RegionSizing::for_run(vcpus, None, period_ns);
        Self::create_sized(dir, vcpus, guest_kind, period_ns, sizing)
    }

    /// Creates and formats both regions for `vcpus` vCPUs in `dir`, with `sizing`.
    pub fn create_sized(
        dir: &Path,
        vcpus: u32,
        guest_kind: &str,
        period_ns: u64,
        sizing: RegionSizing,
    ) -> Result<Self, RegionError> {
        Self::create_labelled(dir, None, vcpus, guest_kind, period_ns, sizing)
    }

    /// Publishes the regions `request` describes in `dir`, sized for its run.
    pub fn for_request(dir: &Path, request: &RegionRequest) -> Result<Self, RegionError> {
        let ns = u64::try_from(request.period.as_nanos()).unwrap_or(u64::MAX);
        let narrow = |n: usize| u32::try_from(n).map_err(|e| RegionError::Count(e.to_string()));
        let vcpus = narrow(request.vcpus)?;
        let tasks = request.tasks.map(narrow).transpose()?;
        let sizing = RegionSizing::for_run(vcpus, tasks, ns);
        Self::create_labelled(dir, Some(&request.vm_name), vcpus, request.kind, ns, sizing)
    }

    /// As [`ProfilerRegions::create_sized`], with the VM's own name (`vm0`, a fleet file's
    /// name) in the metadata for the tools to show; `None` shows the regions' `vm-<pid>-<n>`.
    pub fn create_labelled(
        dir: &Path,
        label: Option<&str>,
        vcpus: u32,
        guest_kind: &str,
        period_ns: u64,
        sizing: RegionSizing,
    ) -> Result<Self, RegionError> {
        let pid = std::process::id();
        let vm = NEXT_VM.fetch_add(1, Ordering::Relaxed);
        let name = format!("vm-{pid}-{vm}");
        // Checked here for a clear error; the publisher checks the layouts again.
        GuestRegionLayout::new(vcpus, sizing.task_capacity, sizing.guest_ring_records)
            .map_err(RegionError::Abi)?;
        HostRegionLayout::new(vcpus, sizing.host_ring_records).map_err(RegionError::Abi)?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let spec = PublishSpec {
            n: vm,
            name: label.map_or_else(|| name.clone(), str::to_string),
            guest: guest_kind.to_string(),
            vcpus,
            tasks: sizing.task_capacity,
            guest_ring: sizing.guest_ring_records,
            host_ring: sizing.host_ring_records,
            generation: (u64::from(pid) << 32) | u64::from(vm) ^ started,
            guest_period_ns: period_ns,
            host_period_ns: period_ns,
        };
        let published = Arc::new(PublishedVm::create(dir, &spec).map_err(RegionError::Publish)?);
        Ok(Self {
            guest: RegionFile {
                vm: Arc::clone(&published),
                kind: Kind::Guest,
            },
            host: RegionFile {
                vm: published,
                kind: Kind::Host,
            },
            name,
            id: (u64::from(pid) << 32) | u64::from(vm),
            period_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn regions_are_private_files_removed_on_drop() {
        let dir = std::env::temp_dir().join(format!("mb-regions-{}", std::process::id()));
        let regions = ProfilerRegions::create(&dir, 2, "workload", 50_000_000).expect("create");
        let guest = regions.guest.path().to_path_buf();
        let host = regions.host.path().to_path_buf();
        for p in [&guest, &host] {
            let mode = std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let guest_region = regions.guest.region().expect("region");
        let view = mirrorball_profiler_abi::validate_guest_region(guest_region).expect("guest");
        assert_eq!(view.sample_period_ns(), 50_000_000);
        let host_region = regions.host.region().expect("region");
        mirrorball_profiler_abi::validate_host_region(host_region).expect("host");
        // Published under their final names; nothing hidden is left behind.
        assert_eq!(
            guest.file_name().and_then(|n| n.to_str()),
            Some(format!("{}.guest", regions.name).as_str())
        );
        assert_eq!(
            host.file_name().and_then(|n| n.to_str()),
            Some(format!("{}.host", regions.name).as_str())
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        drop(regions);
        assert!(!guest.exists() && !host.exists());
    }

    #[test]
    fn a_reader_never_finds_an_unformatted_region() {
        let dir = std::env::temp_dir().join(format!("mb-regions-race-{}", std::process::id()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        if !(name.starts_with("vm-") && name.ends_with(".guest")) {
                            continue;
                        }
                        // A region that vanished between listing and reading is fine.
                        let Ok(bytes) = std::fs::read(entry.path()) else {
                            continue;
                        };
                        assert!(
                            bytes.len() >= 8 && bytes[..8] != [0u8; 8],
                            "{name} was visible before it was formatted"
                        );
                        seen += 1;
                    }
                }
                seen
            })
        };
        for _ in 0..200 {
            drop(ProfilerRegions::create(&dir, 1, "workload", 1_000_000).expect("create"));
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("reader saw only formatted regions");
    }
}
