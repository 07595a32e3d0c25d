//! Profiler regions as files: `vm-<pid>-<n>.guest` (the guest writes it; mapped into guest
//! memory), `vm-<pid>-<n>.host` (only the VMM writes it; never guest-mapped) and
//! `vm-<pid>-<n>.json` (metadata), in the run directory (default `/dev/shm/mirrorball`, or
//! `MIRRORBALL_RUN_DIR`). Files are mode 0600 and removed when the VM's regions are dropped.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::sizing::RegionSizing;
use mirrorball_profiler_abi::{
    GuestRegion, GuestRegionLayout, HostRegion, HostRegionLayout, Region, RegionInit, RegionMut,
    CLOCK_MONOTONIC,
};

/// Default run directory.
pub const DEFAULT_RUN_DIR: &str = "/dev/shm/mirrorball";
/// Environment variable that overrides the run directory.
pub const RUN_DIR_ENV: &str = "MIRRORBALL_RUN_DIR";

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
    /// The ABI refused the layout.
    #[error("profiler region layout: {0:?}")]
    Abi(mirrorball_profiler_abi::AbiError),
}

/// The run directory: `MIRRORBALL_RUN_DIR` or [`DEFAULT_RUN_DIR`].
pub fn run_dir() -> PathBuf {
    std::env::var_os(RUN_DIR_ENV).map_or_else(|| PathBuf::from(DEFAULT_RUN_DIR), PathBuf::from)
}

/// A file of `len` bytes mapped shared and writable; removed and unmapped on drop.
pub struct RegionFile {
    path: PathBuf,
    file: File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process-wide shared memory; every access to it goes through the ABI
// crate's atomics, so moving or sharing the owner between threads is sound.
unsafe impl Send for RegionFile {}
// SAFETY: see above.
unsafe impl Sync for RegionFile {}

impl RegionFile {
    /// Creates `path` (must not exist), sized `len` bytes, mode 0600, and maps it.
    pub fn create(path: &Path, len: usize) -> Result<Self, RegionError> {
        let io = |source| RegionError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let cleanup = |e| {
            let _ = std::fs::remove_file(path);
            io(e)
        };
        file.set_len(len as u64).map_err(cleanup)?;
        // SAFETY: a fresh shared mapping of a file we own, of its full length; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(cleanup(std::io::Error::last_os_error()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    /// Renames the file to `path` (same directory): how a formatted region is published.
    pub fn rename_to(&mut self, path: &Path) -> Result<(), RegionError> {
        std::fs::rename(&self.path, path).map_err(|source| RegionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.path = path.to_path_buf();
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Host address of the mapping.
    pub fn host_addr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: regions have headers).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping for the ABI crate's writers.
    pub fn region_mut(&self) -> Result<RegionMut<'_>, RegionError> {
        // SAFETY: the mapping is live, `len` bytes, page-aligned, for as long as `self`.
        unsafe { RegionMut::from_raw(self.ptr, self.len) }.map_err(RegionError::Abi)
    }

    /// The mapping for the ABI crate's readers.
    pub fn region(&self) -> Result<Region<'_>, RegionError> {
        Ok(self.region_mut()?.as_region())
    }
}

impl Drop for RegionFile {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `create`; nothing uses it afterwards.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The two regions (and metadata file) of one VM.
pub struct ProfilerRegions {
    /// Guest-writable region.
    pub guest: RegionFile,
    /// Host-only region.
    pub host: RegionFile,
    meta_path: PathBuf,
    /// `vm-<pid>-<n>`.
    pub name: String,
    /// `pid << 32 | n`: names the pair of regions (the device reports it to the guest).
    pub id: u64,
    /// Initial sample period, ns.
    pub period_ns: u64,
}

static NEXT_VM: AtomicU32 = AtomicU32::new(0);

/// What the metadata file says about the VM.
#[derive(Debug, serde::Serialize)]
struct Meta<'a> {
    pid: u32,
    vm: u32,
    name: &'a str,
    vcpus: u32,
    guest: &'a str,
    started_unix_ms: u128,
    period_ns: u64,
}

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
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| RegionError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let pid = std::process::id();
        let vm = NEXT_VM.fetch_add(1, Ordering::Relaxed);
        let name = format!("vm-{pid}-{vm}");
        let guest_layout =
            GuestRegionLayout::new(vcpus, sizing.task_capacity, sizing.guest_ring_records)
                .map_err(RegionError::Abi)?;
        let host_layout =
            HostRegionLayout::new(vcpus, sizing.host_ring_records).map_err(RegionError::Abi)?;
        // Created and formatted under hidden names that readers skip (they only look at `vm-*`),
        // then renamed into place: a reader never finds a region that is not formatted yet.
        let hidden = |kind: &str| dir.join(format!(".{name}.{kind}.partial"));
        let mut guest = RegionFile::create(&hidden("guest"), guest_layout.size)?;
        let mut host = RegionFile::create(&hidden("host"), host_layout.size)?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let init = RegionInit {
            generation: (u64::from(pid) << 32) | u64::from(vm) ^ (started as u64),
            sample_period_ns: period_ns,
            clock_id: CLOCK_MONOTONIC,
        };
        GuestRegion::format(guest.region_mut()?, &guest_layout, &init).map_err(RegionError::Abi)?;
        HostRegion::format(host.region_mut()?, &host_layout, &init).map_err(RegionError::Abi)?;
        let meta_path = dir.join(format!("{name}.json"));
        let meta = Meta {
            pid,
            vm,
            name: &name,
            vcpus,
            guest: guest_kind,
            started_unix_ms: started,
            period_ns,
        };
        let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        std::fs::write(&meta_path, json).map_err(|source| RegionError::Io {
            path: meta_path.clone(),
            source,
        })?;
        let published = host
            .rename_to(&dir.join(format!("{name}.host")))
            .and_then(|()| guest.rename_to(&dir.join(format!("{name}.guest"))));
        if let Err(e) = published {
            let _ = std::fs::remove_file(&meta_path);
            return Err(e);
        }
        Ok(Self {
            guest,
            host,
            meta_path,
            name,
            id: (u64::from(pid) << 32) | u64::from(vm),
            period_ns,
        })
    }
}

impl Drop for ProfilerRegions {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.meta_path);
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
