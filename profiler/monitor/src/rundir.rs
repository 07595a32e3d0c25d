//! The run directory: where running VMs publish their profiler regions, and how readers find them.
//!
//! A running VM publishes, in the run directory (default [`DEFAULT_RUN_DIR`], created mode 0700;
//! overridden by the environment variable [`RUN_DIR_ENV`] or a `--run-dir` option):
//!
//! - `vm-<pid>-<n>.guest`: the guest region (written by the guest: hostile), mode 0600;
//! - `vm-<pid>-<n>.host`: the host region (written only by the VMM), mode 0600;
//! - `vm-<pid>-<n>.json`: metadata ([`VmMeta`]);
//! - `vm-<pid>-<n>.ctl`: the VM's control socket (the VMM's `control` module), mode 0600.
//!
//! The files are removed when the VM ends. While it runs, the VMM holds an exclusive `flock` on
//! its host region file: that lock, not the pid alone (pids are reused; anyone who can write the
//! directory can name a file after a live pid), is what makes a set live. A set whose lock is
//! free or whose `pid` is not a live process is stale: it is reported ([`Scan::stale`]), never
//! opened, and removed by the next publisher ([`sweep_stale`]), so a VMM killed by SIGKILL
//! leaves its tmpfs pages behind only until the next VM starts.
//!
//! This module and [`crate::publish`] are the one implementation of this protocol: the VMM
//! publishes through [`crate::publish::PublishedVm`], the tools read through [`scan`]. A
//! publisher creates each file exclusively (`O_EXCL`, `O_NOFOLLOW`, mode 0600) under a hidden
//! temporary name, fills it and `rename`s it into place (the region files first, the metadata
//! last), so a reader never sees a half-written file under its final name. The directory itself
//! must be private ([`ensure_run_dir`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Environment variable that overrides the default run directory.
pub const RUN_DIR_ENV: &str = "MIRRORBALL_RUN_DIR";
/// Default run directory.
pub const DEFAULT_RUN_DIR: &str = "/dev/shm/mirrorball";
/// Largest metadata file a reader reads.
pub const MAX_META_BYTES: u64 = 64 * 1024;
/// Most directory entries one scan looks at (a run directory holds a few files per VM).
pub const MAX_SCAN_ENTRIES: usize = 100_000;

/// The run directory to use: `explicit` if given, else `$MIRRORBALL_RUN_DIR` if set and not
/// empty, else [`DEFAULT_RUN_DIR`].
pub fn resolve_run_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    match std::env::var_os(RUN_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_RUN_DIR),
    }
}

/// Creates the run directory if it does not exist (its parents as needed, itself mode 0700),
/// and refuses one that others could plant files in: it must be a directory (not a symlink
/// owned by someone else) owned by this user and writable by no one else. Errors are one line
/// naming the directory and the fix.
pub fn ensure_run_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::create_dir_all(parent).map_err(|e| refuse(dir, &format!("cannot create: {e}")))?;
        }
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(refuse(dir, &format!("cannot create it: {e}"))),
    }
    check_run_dir(dir)
}

fn refuse(dir: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("run directory {}: {why}", dir.display()),
    )
}

/// The checks of [`ensure_run_dir`] on an existing directory.
pub fn check_run_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let link = fs::symlink_metadata(dir).map_err(|e| refuse(dir, &e.to_string()))?;
    if link.file_type().is_symlink() && link.uid() != me && link.uid() != 0 {
        return Err(refuse(
            dir,
            &format!(
                "a symbolic link owned by uid {}, not you: remove it or choose another \
                 directory (--run-dir or {RUN_DIR_ENV})",
                link.uid()
            ),
        ));
    }
    let meta = fs::metadata(dir).map_err(|e| refuse(dir, &e.to_string()))?;
    if !meta.is_dir() {
        return Err(refuse(
            dir,
            &format!(
                "exists and is not a directory: remove it or choose another directory \
                 (--run-dir or {RUN_DIR_ENV})"
            ),
        ));
    }
    if meta.uid() != me {
        return Err(refuse(
            dir,
            &format!(
                "owned by uid {}, not you (uid {me}): others could plant files there; remove it \
                 or choose another directory (--run-dir or {RUN_DIR_ENV})",
                meta.uid()
            ),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(
            dir,
            &format!(
                "writable by others (mode {mode:04o}): run `chmod 700 {}` or choose another \
                 directory (--run-dir or {RUN_DIR_ENV})",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Identifies one VM: the VMM's process id and its VM number within that process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmId {
    /// Process id of the VMM.
    pub pid: u32,
    /// VM number within the process.
    pub n: u32,
}

impl VmId {
    /// The common file-name stem, `vm-<pid>-<n>`.
    pub fn stem(&self) -> String {
        format!("vm-{}-{}", self.pid, self.n)
    }

    /// Parses a file name `vm-<pid>-<n>.<ext>` into the id and the extension.
    pub fn parse_file_name(name: &str) -> Option<(VmId, &str)> {
        let rest = name.strip_prefix("vm-")?;
        let (stem, ext) = rest.split_once('.')?;
        let id = parse_pid_n(stem)?;
        Some((id, ext))
    }
}

fn parse_decimal(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_pid_n(text: &str) -> Option<VmId> {
    let (pid, n) = text.split_once('-')?;
    Some(VmId {
        pid: parse_decimal(pid)?,
        n: parse_decimal(n)?,
    })
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.pid, self.n)
    }
}

impl FromStr for VmId {
    type Err = String;

    /// Parses `PID-N` (also accepts `vm-PID-N`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let t = t.strip_prefix("vm-").unwrap_or(t);
        parse_pid_n(t).ok_or_else(|| format!("{s:?} is not a VM id (expected PID-N, e.g. 1234-0)"))
    }
}

/// The metadata file `vm-<pid>-<n>.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMeta {
    /// Process id of the VMM.
    pub pid: u32,
    /// VM number within the process.
    pub vm: u32,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// vCPUs.
    #[serde(default)]
    pub vcpus: u32,
    /// `"linux"` or `"workload"`.
    #[serde(default)]
    pub guest: String,
    /// Wall-clock start, ms since the Unix epoch.
    #[serde(default)]
    pub started_unix_ms: u64,
    /// The sampling period the VM started with, ns (0 = not given).
    #[serde(default)]
    pub period_ns: u64,
}

/// Opens a file for reading without following a symlink and without blocking on a FIFO, and
/// checks that it is a regular file.
pub(crate) fn open_regular(path: &Path) -> io::Result<fs::File> {
    // (Errors name no path: callers add it.)
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Reads and parses a metadata file (at most [`MAX_META_BYTES`]).
pub fn read_meta(path: &Path) -> Result<VmMeta, String> {
    let file = open_regular(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = Vec::new();
    file.take(MAX_META_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_META_BYTES {
        return Err(format!(
            "{}: larger than {MAX_META_BYTES} bytes",
            path.display()
        ));
    }
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// True if another open file description holds a lock on `file` (a VMM's exclusive lock on its
/// host region).
pub(crate) fn lock_held(file: &fs::File) -> bool {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: flock on a descriptor we own; a shared lock that succeeds is released at once.
    if unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        // SAFETY: as above.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        return false;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// True while a running VMM holds the lock on the host region at `path`.
pub fn host_region_locked(path: &Path) -> bool {
    open_regular(path).is_ok_and(|f| lock_held(&f))
}

/// True if a process with this id exists (it may belong to another user).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for the process's existence and our permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A VM whose files are in the run directory and whose process is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmHandle {
    /// Its id.
    pub id: VmId,
    /// The run directory.
    pub dir: PathBuf,
    /// Its metadata, if the file was there and parsed.
    pub meta: Option<VmMeta>,
    /// Why the metadata is missing or unusable, if it is.
    pub meta_error: Option<String>,
}

impl VmHandle {
    /// A handle for `id` in `dir`, reading its metadata if present.
    pub fn new(dir: &Path, id: VmId) -> Self {
        let mut handle = Self {
            id,
            dir: dir.to_path_buf(),
            meta: None,
            meta_error: None,
        };
        let path = handle.meta_path();
        match read_meta(&path) {
            Ok(meta) if meta.pid != id.pid || meta.vm != id.n => {
                handle.meta_error = Some(format!(
                    "{}: names VM {}-{}, not {id}",
                    path.display(),
                    meta.pid,
                    meta.vm
                ));
            }
            Ok(meta) => handle.meta = Some(meta),
            Err(e) => handle.meta_error = Some(e),
        }
        handle
    }

    fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.id.stem()))
    }

    /// `vm-<pid>-<n>.guest`.
    pub fn guest_path(&self) -> PathBuf {
        self.path("guest")
    }

    /// `vm-<pid>-<n>.host`.
    pub fn host_path(&self) -> PathBuf {
        self.path("host")
    }

    /// `vm-<pid>-<n>.ctl`: the VM's control socket.
    pub fn ctl_path(&self) -> PathBuf {
        self.path("ctl")
    }

    /// `vm-<pid>-<n>.json`.
    pub fn meta_path(&self) -> PathBuf {
        self.path("json")
    }

    /// The metadata's name, or the id.
    pub fn name(&self) -> String {
        match &self.meta {
            Some(m) if !m.name.is_empty() => crate::sanitize(m.name.as_bytes(), 64),
            _ => format!("vm-{}", self.id),
        }
    }

    /// True while the VMM process is alive and holds its host region's lock.
    pub fn is_alive(&self) -> bool {
        pid_alive(self.id.pid) && host_region_locked(&self.host_path())
    }

    /// Maps both regions read-only and validates them.
    pub fn open(&self) -> Result<crate::OpenVm, crate::OpenError> {
        crate::OpenVm::open(self.clone())
    }
}

/// A set of VM files the scan did not offer as live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleVm {
    /// The id in the file names.
    pub id: VmId,
    /// Why it is not live.
    pub reason: String,
}

/// What a scan of the run directory found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// VMs whose process is alive and whose two region files are present.
    pub live: Vec<VmHandle>,
    /// File sets whose process is gone, or that lack a region file.
    pub stale: Vec<StaleVm>,
    /// Names that start with `vm-` but are not `vm-<pid>-<n>.{guest,host,json}`.
    pub ignored: Vec<PathBuf>,
}

#[derive(Default)]
struct Found {
    guest: bool,
    host: bool,
    meta: bool,
}

/// Lists the run directory. A directory that does not exist yet is an empty scan.
pub fn scan(dir: &Path) -> io::Result<Scan> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(e) => return Err(e),
    };
    let mut found: BTreeMap<VmId, Found> = BTreeMap::new();
    let mut out = Scan::default();
    for entry in entries.take(MAX_SCAN_ENTRIES) {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("vm-") {
            continue;
        }
        match VmId::parse_file_name(name) {
            Some((id, "guest")) => found.entry(id).or_default().guest = true,
            Some((id, "host")) => found.entry(id).or_default().host = true,
            Some((id, "json")) => found.entry(id).or_default().meta = true,
            // The control socket belongs to the set but does not make it live.
            Some((_, "ctl")) => {}
            _ => out.ignored.push(entry.path()),
        }
    }
    for (id, f) in found {
        if !pid_alive(id.pid) {
            out.stale.push(StaleVm {
                id,
                reason: format!("process {} is not running", id.pid),
            });
        } else if !(f.guest && f.host) {
            let missing = match (f.guest, f.host) {
                (false, false) => "both region files",
                (false, true) => "the guest region file",
                _ => "the host region file",
            };
            out.stale.push(StaleVm {
                id,
                reason: format!("{missing} missing"),
            });
        } else if !host_region_locked(&dir.join(format!("{}.host", id.stem()))) {
            out.stale.push(StaleVm {
                id,
                reason: "no running VMM holds its host region (left behind or planted)".into(),
            });
        } else {
            let _ = f.meta;
            out.live.push(VmHandle::new(dir, id));
        }
    }
    Ok(out)
}

/// Removes the files of stale sets in `dir`: sets whose process is gone, or whose host region
/// no VMM holds, and hidden temporary files of processes that are gone. A set whose process is
/// alive but lacks its host region is being removed by its owner and left alone. Returns the
/// number of files removed. Only a publisher calls this, on a directory [`ensure_run_dir`]
/// accepted (so every file in it is this user's).
pub fn sweep_stale(dir: &Path) -> usize {
    let Ok(found) = scan(dir) else { return 0 };
    let mut removed = 0;
    for stale in &found.stale {
        let host = dir.join(format!("{}.host", stale.id.stem()));
        let host_present = fs::symlink_metadata(&host).is_ok();
        if pid_alive(stale.id.pid) && (!host_present || host_region_locked(&host)) {
            continue;
        }
        for ext in ["json", "guest", "host", "ctl"] {
            if fs::remove_file(dir.join(format!("{}.{ext}", stale.id.stem()))).is_ok() {
                removed += 1;
            }
        }
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.take(MAX_SCAN_ENTRIES).flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(hidden) = name.strip_prefix('.').filter(|n| n.ends_with(".tmp")) else {
            continue;
        };
        let dead = VmId::parse_file_name(hidden).is_some_and(|(id, _)| !pid_alive(id.pid));
        if dead && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The live VMs in `run_dir` (stale sets and unreadable directories yield nothing).
pub fn discover(run_dir: &Path) -> Vec<VmHandle> {
    scan(run_dir).map(|s| s.live).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print() {
        assert_eq!("12-3".parse::<VmId>(), Ok(VmId { pid: 12, n: 3 }));
        assert_eq!("vm-12-3".parse::<VmId>(), Ok(VmId { pid: 12, n: 3 }));
        for bad in [
            "",
            "12",
            "-3",
            "12-",
            "a-1",
            "1-b",
            "1-2-3",
            "99999999999-1",
            "+1-2",
        ] {
            assert!(bad.parse::<VmId>().is_err(), "{bad:?}");
        }
        assert_eq!(VmId { pid: 7, n: 0 }.to_string(), "7-0");
        assert_eq!(
            VmId::parse_file_name("vm-7-0.guest"),
            Some((VmId { pid: 7, n: 0 }, "guest"))
        );
        assert_eq!(
            VmId::parse_file_name("vm-7-0.guest.tmp"),
            Some((VmId { pid: 7, n: 0 }, "guest.tmp"))
        );
        assert_eq!(VmId::parse_file_name("vm-7.guest"), None);
    }

    #[test]
    fn run_dir_resolution() {
        let p = PathBuf::from("/x/y");
        assert_eq!(resolve_run_dir(Some(&p)), p);
    }

    #[test]
    fn liveness() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }
}
