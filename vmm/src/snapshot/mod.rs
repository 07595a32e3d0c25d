//! Snapshots of running VMs and clones restored from them.
//!
//! A snapshot directory holds `state.json` ([`state`]: configuration, host facts, vCPU and
//! device state), `checksum` (CRC-32 of `state.json`), `memory.bin` (the guest RAM, sparse:
//! [`memory`]) and, for a profiled VM, `guest-region.bin` (the profiler's guest region: the
//! tasks the guest registered). [`write`] creates them (mode 0600, `O_EXCL|O_NOFOLLOW`, in a
//! new or empty directory); [`restore`] loads a directory, refusing a bad one with one line, and
//! builds clones whose RAM maps `memory.bin` copy-on-write through the template mechanism of
//! `vstate::memory` (so the sharing accounting applies unchanged). Taking one is the session's
//! (`session/snapshot.rs`): pause, capture each vCPU on its own parked thread, write, resume.
//!
//! Both guests are supported: the OS-less workload (task progress) and Linux (the in-kernel
//! interrupt chips, PIT and clock in [`machine`], the devices' state), with or without a
//! copy-on-write disk ([`disk`]: `disk-overlay.bin` holds the disk's written blocks; clones
//! read it as a shared layer under a private overlay each).
//!
//! `--lazy` restores instead into memory of each clone's own, loaded page by page from
//! `memory.bin` on first touch through userfaultfd ([`lazy`]).
pub mod disk;
pub mod lazy;
pub mod machine;
pub mod memory;
pub mod restore;
pub mod state;
pub mod vcpu;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Exit code of a refused snapshot or restore (bad, foreign or unreadable snapshot; directory
/// missing, not empty or not writable).
pub const EXIT_SNAPSHOT: i32 = 22;

/// File names in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// Checksum of the state file.
pub const CHECKSUM_FILE: &str = "checksum";
/// Guest memory.
pub const MEMORY_FILE: &str = "memory.bin";
/// The profiler's guest region.
pub const GUEST_REGION_FILE: &str = "guest-region.bin";

/// A refused snapshot or restore: one line.
#[derive(Debug, thiserror::Error)]
#[error("snapshot {dir}: {why}")]
pub struct SnapshotError {
    /// The directory.
    pub dir: String,
    /// What is wrong.
    pub why: String,
}

impl SnapshotError {
    /// An error about `dir`.
    pub fn new(dir: &Path, why: impl Into<String>) -> Self {
        Self {
            dir: dir.display().to_string(),
            why: why.into(),
        }
    }
}

/// Prepares `dir` for a new snapshot: creates it (mode 0700; its parent must exist) or accepts
/// an existing empty directory. Returns whether it created `dir` (a failed snapshot then
/// removes it again: [`remove_partial`]).
pub fn prepare_dir(dir: &Path) -> Result<bool, SnapshotError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir)
                .map_err(|e| SnapshotError::new(dir, e.to_string()))?;
            if !meta.is_dir() {
                return Err(SnapshotError::new(dir, "exists and is not a directory"));
            }
            let mut entries =
                std::fs::read_dir(dir).map_err(|e| SnapshotError::new(dir, e.to_string()))?;
            if entries.next().is_some() {
                return Err(SnapshotError::new(dir, "exists and is not empty"));
            }
            Ok(false)
        }
        Err(e) => Err(SnapshotError::new(dir, format!("cannot create it: {e}"))),
    }
}

/// Creates `name` in `dir` exclusively, mode 0600, not following a symlink.
pub fn create_file(dir: &Path, name: &str) -> Result<File, SnapshotError> {
    std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(name))
        .map_err(|e| SnapshotError::new(dir, format!("cannot create {name}: {e}")))
}

/// Writes the state file and then its checksum (the checksum last: a snapshot without it is
/// incomplete).
pub fn write_state(dir: &Path, state: &state::SnapshotState) -> Result<u64, SnapshotError> {
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| SnapshotError::new(dir, format!("cannot encode the state: {e}")))?;
    if bytes.len() as u64 > state::MAX_STATE_BYTES {
        return Err(SnapshotError::new(
            dir,
            format!(
                "the state is {} bytes, more than a restore reads ({})",
                bytes.len(),
                state::MAX_STATE_BYTES
            ),
        ));
    }
    let io = |e: std::io::Error| SnapshotError::new(dir, e.to_string());
    let mut f = create_file(dir, STATE_FILE)?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    let mut c = create_file(dir, CHECKSUM_FILE)?;
    c.write_all(state::checksum_line(&bytes).as_bytes())
        .and_then(|()| c.sync_all())
        .map_err(io)?;
    Ok(bytes.len() as u64)
}

/// Removes what a failed snapshot left in `dir`: the files a snapshot writes, then `dir` itself
/// when [`prepare_dir`] `created` it (only if it is empty by then: nothing else is touched).
pub fn remove_partial(dir: &Path, created: bool) {
    for name in [
        CHECKSUM_FILE,
        STATE_FILE,
        MEMORY_FILE,
        GUEST_REGION_FILE,
        disk::DISK_OVERLAY_FILE,
    ] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    if created {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Bytes a file takes on disk (its holes excluded).
pub fn allocated_bytes(path: &PathBuf) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks().saturating_mul(512))
}

impl From<SnapshotError> for String {
    fn from(e: SnapshotError) -> Self {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_snapshot_removes_its_files_and_only_a_directory_it_created() {
        let base = std::env::temp_dir().join(format!("mb-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("scratch");
        // A directory the snapshot created goes with its files.
        let new = base.join("new");
        assert!(prepare_dir(&new).expect("prepare"), "created");
        create_file(&new, MEMORY_FILE).expect("memory.bin");
        remove_partial(&new, true);
        assert!(!new.exists(), "the created directory is removed");
        // An existing empty directory stays, emptied.
        let old = base.join("old");
        std::fs::create_dir(&old).expect("mkdir");
        assert!(!prepare_dir(&old).expect("prepare"), "existed");
        create_file(&old, STATE_FILE).expect("state.json");
        remove_partial(&old, false);
        assert!(old.is_dir(), "an existing directory stays");
        assert_eq!(std::fs::read_dir(&old).expect("read_dir").count(), 0);
        // A file the snapshot does not write keeps a created directory in place.
        let other = base.join("other");
        assert!(prepare_dir(&other).expect("prepare"));
        std::fs::write(other.join("theirs"), b"x").expect("write");
        remove_partial(&other, true);
        assert!(
            other.join("theirs").exists(),
            "not a snapshot file: untouched"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
