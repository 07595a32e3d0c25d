//! The publishing side of the run-directory protocol ([`crate::rundir`]): create, format and
//! publish both regions and the metadata of one VM. The VMM (`vmm/src/profiling/regions.rs`),
//! the `fake_vm` example and the tests all publish through it.
//!
//! The run directory must pass [`ensure_run_dir`] the first time a process publishes there,
//! when stale sets in it are removed ([`sweep_stale`]), and its checks (owner, mode) for every
//! later VM. Each file is created exclusively (`O_EXCL`, `O_NOFOLLOW`, mode 0600; a leftover at
//! its name, from an earlier process with our pid, is removed and the creation tried again) under
//! a hidden temporary name (`.vm-<pid>-<n>.<ext>.tmp`, which readers ignore), filled, and renamed
//! into place: the host region (already locked, see [`crate::rundir`]), then the guest region,
//! then the metadata. Dropping the [`PublishedVm`] removes the three files, then releases the
//! lock.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mirrorball_profiler_abi::{
    GuestRegion, GuestRegionLayout, HostRegion, HostRegionLayout, RegionInit, CLOCK_MONOTONIC,
};

use crate::mapping::Mapping;
use crate::rundir::{check_run_dir, ensure_run_dir, sweep_stale, VmId, VmMeta};

/// What to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishSpec {
    /// VM number within this process.
    pub n: u32,
    /// Name for the metadata.
    pub name: String,
    /// `"linux"` or `"workload"`.
    pub guest: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Task-table entries.
    pub tasks: u32,
    /// Guest ring records.
    pub guest_ring: u32,
    /// Host ring records.
    pub host_ring: u32,
    /// Generation written in both headers.
    pub generation: u64,
    /// Guest sampler period, ns.
    pub guest_period_ns: u64,
    /// Host sampler period, ns.
    pub host_period_ns: u64,
}

impl Default for PublishSpec {
    fn default() -> Self {
        Self {
            n: 0,
            name: "vm".into(),
            guest: "workload".into(),
            vcpus: 1,
            tasks: 64,
            guest_ring: 4096,
            host_ring: 4096,
            generation: 1,
            guest_period_ns: 50_000_000,
            host_period_ns: 50_000_000,
        }
    }
}

/// A VM's published files, owned by the publisher; removed on drop.
#[derive(Debug)]
pub struct PublishedVm {
    id: VmId,
    dir: PathBuf,
    guest: Mapping,
    host: Mapping,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn abi(e: mirrorball_profiler_abi::AbiError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

/// Makes `dir` ready for a VM's files: created (0700) and swept of stale sets the first time
/// this process publishes there; later only checked (owner and mode) — creating it again would
/// lock its parent, which every VM of a launch would queue on. A sweep reads every set's
/// metadata and lock, so sweeping at each publish would make starting N VMs O(N²); a set left
/// by a VMM that dies later is removed by the next process that publishes.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    static PREPARED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
    let known = prepared.iter().any(|d| d == dir);
    if known && check_run_dir(dir).is_ok() {
        return Ok(());
    }
    ensure_run_dir(dir)?;
    if !known {
        sweep_stale(dir);
        prepared.push(dir.to_path_buf());
    }
    Ok(())
}

/// `create(path)` for a file that must be new; a leftover at `path` (our pid's, from an earlier
/// process that had it) is removed and the creation tried once more.
fn create_fresh<T>(path: &Path, create: impl Fn(&Path) -> io::Result<T>) -> io::Result<T> {
    match create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            create(path)
        }
        other => other,
    }
}

impl PublishedVm {
    /// Publishes a VM of this process (`pid` = our pid) in `dir` (created 0700 if missing).
    pub fn create(dir: &Path, spec: &PublishSpec) -> io::Result<Self> {
        Self::create_as(dir, std::process::id(), spec)
    }

    /// Publishes a VM under another pid (tests: stale files).
    pub fn create_as(dir: &Path, pid: u32, spec: &PublishSpec) -> io::Result<Self> {
        prepare_dir(dir)?;
        let id = VmId { pid, n: spec.n };
        let glayout =
            GuestRegionLayout::new(spec.vcpus, spec.tasks, spec.guest_ring).map_err(abi)?;
        let hlayout = HostRegionLayout::new(spec.vcpus, spec.host_ring).map_err(abi)?;
        let tmp = |ext: &str| dir.join(format!(".{}.{ext}.tmp", id.stem()));
        let fin = |ext: &str| dir.join(format!("{}.{ext}", id.stem()));
        let host = create_fresh(&tmp("host"), |p| Mapping::create_rw(p, hlayout.size))?;
        host.lock_exclusive()?;
        // The files were just sized: their bytes are zero, so formatting touches only what
        // is not (zeroing the rings would fault in every page of them).
        HostRegion::format_zeroed(
            host.region_mut()?,
            &hlayout,
            &RegionInit {
                generation: spec.generation,
                sample_period_ns: spec.host_period_ns,
                clock_id: CLOCK_MONOTONIC,
            },
        )
        .map_err(abi)?;
        let guest = create_fresh(&tmp("guest"), |p| Mapping::create_rw(p, glayout.size))?;
        GuestRegion::format_zeroed(
            guest.region_mut()?,
            &glayout,
            &RegionInit {
                generation: spec.generation,
                sample_period_ns: spec.guest_period_ns,
                clock_id: CLOCK_MONOTONIC,
            },
        )
        .map_err(abi)?;
        let meta = VmMeta {
            pid,
            vm: spec.n,
            name: spec.name.clone(),
            vcpus: spec.vcpus,
            guest: spec.guest.clone(),
            started_unix_ms: now_unix_ms(),
            period_ns: spec.host_period_ns,
        };
        {
            let mut f = create_fresh(&tmp("json"), |p| {
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(p)
            })?;
            f.write_all(&serde_json::to_vec(&meta).map_err(io::Error::other)?)?;
        }
        let vm = Self {
            id,
            dir: dir.to_path_buf(),
            guest,
            host,
        };
        for ext in ["host", "guest", "json"] {
            if let Err(e) = fs::rename(tmp(ext), fin(ext)) {
                for ext in ["guest", "host", "json"] {
                    let _ = fs::remove_file(tmp(ext));
                }
                return Err(e);
            }
        }
        Ok(vm)
    }

    /// The VM's id.
    pub fn id(&self) -> VmId {
        self.id
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest region, for writing (what the guest driver does).
    pub fn guest(&self) -> io::Result<GuestRegion<'_>> {
        GuestRegion::attach(self.guest.region_mut()?).map_err(abi)
    }

    /// The host region, for writing (what the VMM's sampler does).
    pub fn host(&self) -> io::Result<HostRegion<'_>> {
        HostRegion::attach(self.host.region_mut()?).map_err(abi)
    }

    /// The guest region, for the ABI crate's writers (a VMM formats and reads it).
    pub fn guest_region_mut(&self) -> io::Result<mirrorball_profiler_abi::RegionMut<'_>> {
        self.guest.region_mut()
    }

    /// The host region, for the ABI crate's writers (the VMM's sampler).
    pub fn host_region_mut(&self) -> io::Result<mirrorball_profiler_abi::RegionMut<'_>> {
        self.host.region_mut()
    }

    /// Start and length of the guest region's shared mapping: the VMM maps it into guest
    /// memory. Valid while `self` lives.
    pub fn guest_mapping(&self) -> (*mut u8, usize) {
        (self.guest.as_ptr(), self.guest.len())
    }

    /// Path of the published guest region.
    pub fn guest_path(&self) -> PathBuf {
        self.dir.join(format!("{}.guest", self.id.stem()))
    }

    /// Path of the published host region.
    pub fn host_path(&self) -> PathBuf {
        self.dir.join(format!("{}.host", self.id.stem()))
    }

    /// The whole guest mapping, writable, for tests that play a hostile guest (write it only
    /// with atomics).
    pub fn guest_raw(&self) -> io::Result<mirrorball_profiler_abi::RegionMut<'_>> {
        self.guest.region_mut()
    }

    /// Removes the files now (also done on drop).
    pub fn unpublish(&self) {
        for ext in ["json", "guest", "host"] {
            let _ = fs::remove_file(self.dir.join(format!("{}.{ext}", self.id.stem())));
        }
    }
}

impl Drop for PublishedVm {
    fn drop(&mut self) {
        self.unpublish();
    }
}
