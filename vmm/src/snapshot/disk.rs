//! The copy-on-write disk in a snapshot: what the state file records about it
//! ([`DiskSnapshot`]), saving its overlay ([`save`]) and, on restore, finding the same base
//! image ([`open_base`]) and loading the overlay as the clones' shared middle layer
//! ([`open_layer`]).
//!
//! Saved: the base image's identity (its absolute path, size, modification time, inode, and a
//! CRC-32 of its first and last MiB — cheap, and a changed file is caught by either the
//! metadata or the content of its ends), whether reads mapped base pages (`map=on`), and
//! `disk-overlay.bin`: every block the disk held above its base (its own overlay and, for a
//! clone, its snapshot layer), sparse, with the list of blocks and their CRC-32 in the state
//! file. A restore refuses, with one line, a base that is missing or differs in any of these,
//! and an overlay file that is truncated or does not match its checksum.
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mirrorball_devices::virtio_blk::disk::{BaseImage, CowDisk, DiskError};
use mirrorball_devices::virtio_blk::layer::{self, LayerFacts, SnapshotLayer};
use serde::{Deserialize, Serialize};

use super::SnapshotError;
use crate::builder::disk::DiskSpec;

/// The overlay file in a snapshot directory.
pub const DISK_OVERLAY_FILE: &str = "disk-overlay.bin";
/// Bytes at each end of the base image covered by its fingerprint.
const EDGE: u64 = 1 << 20;

/// The disk of a snapshotted VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSnapshot {
    /// The base image it read through.
    pub base: BaseIdentity,
    /// `map=on`: reads of whole base pages were mapped (the clones' disks map too).
    pub map: bool,
    /// The blocks held above the base.
    pub overlay: OverlayFacts,
}

/// Which file a base image was, and a fingerprint of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseIdentity {
    /// Absolute path.
    pub path: PathBuf,
    /// Size, bytes.
    pub bytes: u64,
    /// Modification time, seconds and nanoseconds since the epoch.
    pub mtime: (i64, i64),
    /// Inode number.
    pub inode: u64,
    /// CRC-32 of its first MiB followed by its last MiB (the whole file if smaller).
    pub edge_crc32: u32,
}

/// The overlay file and the blocks it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayFacts {
    /// Its name in the snapshot directory.
    pub file: String,
    /// Its size (the disk's capacity), bytes.
    pub bytes: u64,
    /// Blocks held.
    pub blocks: u64,
    /// Runs of held blocks: [first block, count], ascending.
    pub runs: Vec<[u64; 2]>,
    /// CRC-32 over (block number, block) of every held block.
    pub crc32: u32,
}

impl OverlayFacts {
    fn layer_facts(&self) -> LayerFacts {
        LayerFacts {
            bytes: self.bytes,
            runs: self.runs.iter().map(|&[s, n]| (s, n)).collect(),
            blocks: self.blocks,
            crc32: self.crc32,
        }
    }
}

/// The identity of the open base image `file` at `path`.
fn identify(file: &File, path: &Path) -> std::io::Result<BaseIdentity> {
    let meta = file.metadata()?;
    let bytes = meta.len();
    let mut hasher = crc32fast::Hasher::new();
    let head = bytes.min(EDGE);
    let tail_start = bytes.saturating_sub(EDGE).max(head);
    for (start, end) in [(0, head), (tail_start, bytes)] {
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        file.read_exact_at(&mut buf, start)?;
        hasher.update(&buf);
    }
    Ok(BaseIdentity {
        path: path.to_path_buf(),
        bytes,
        mtime: (meta.mtime(), meta.mtime_nsec()),
        inode: meta.ino(),
        edge_crc32: hasher.finalize(),
    })
}

/// Saves `disk`'s blocks into `dir` (a new `disk-overlay.bin`, mode 0600, `O_EXCL`,
/// `O_NOFOLLOW`) and records its base.
pub fn save(dir: &Path, disk: &CowDisk, map: bool) -> Result<DiskSnapshot, String> {
    let base = disk.base();
    let path = std::fs::canonicalize(base.path()).map_err(|e| {
        format!(
            "cannot resolve the disk's base image {}: {e}",
            base.path().display()
        )
    })?;
    let identity = identify(base.file(), &path)
        .map_err(|e| format!("cannot read the base image {}: {e}", path.display()))?;
    let out = super::create_file(dir, DISK_OVERLAY_FILE)?;
    let facts = layer::write_layer(disk, &out).map_err(|e| {
        format!(
            "cannot write {}: {e}",
            dir.join(DISK_OVERLAY_FILE).display()
        )
    })?;
    Ok(DiskSnapshot {
        base: identity,
        map,
        overlay: OverlayFacts {
            file: DISK_OVERLAY_FILE.into(),
            bytes: facts.bytes,
            blocks: facts.blocks,
            runs: facts.runs.iter().map(|&(s, n)| [s, n]).collect(),
            crc32: facts.crc32,
        },
    })
}

/// Checks a state file's disk record (bounds only; the files are checked on restore).
pub fn validate(d: &DiskSnapshot) -> Result<(), String> {
    let f = &d.overlay;
    if f.file.is_empty() || f.file.contains('/') || f.file.starts_with('.') {
        return Err(format!("state.json: bad file name {:?}", f.file));
    }
    if !d.base.path.is_absolute() {
        return Err("state.json: the disk's base image path is not absolute".into());
    }
    if f.bytes != d.base.bytes || f.bytes == 0 || !f.bytes.is_multiple_of(512) {
        return Err("state.json: the disk overlay's size does not match its base image".into());
    }
    if f.runs.len() > layer::MAX_RUNS {
        return Err("state.json: the disk overlay has too many runs".into());
    }
    Ok(())
}

/// Opens the base image `id` names, refusing one that is missing or no longer the same file.
pub fn open_base(id: &BaseIdentity) -> Result<Arc<BaseImage>, String> {
    let base = BaseImage::open(&id.path).map_err(|e| match e {
        DiskError::OpenBase { path, source } => format!(
            "the disk's base image {} cannot be opened: {source}",
            path.display()
        ),
        other => format!("the disk's {other}"),
    })?;
    let now = identify(base.file(), &id.path)
        .map_err(|e| format!("cannot read the base image {}: {e}", id.path.display()))?;
    let differs = [
        ("size", now.bytes != id.bytes),
        ("modification time", now.mtime != id.mtime),
        ("inode", now.inode != id.inode),
        ("first/last MiB", now.edge_crc32 != id.edge_crc32),
    ];
    let what: Vec<&str> = differs.iter().filter(|d| d.1).map(|d| d.0).collect();
    if !what.is_empty() {
        return Err(format!(
            "the disk's base image {} has changed since the snapshot ({} {})",
            id.path.display(),
            what.join(", "),
            if what.len() == 1 { "differs" } else { "differ" }
        ));
    }
    Ok(base)
}

/// The disk a restored clone of the snapshot in `dir` gets: the snapshot's base, the
/// snapshot's overlay as a shared layer and the clone's own overlay in memory.
pub fn spec(dir: &Path, d: &DiskSnapshot) -> Result<DiskSpec, String> {
    let base = open_base(&d.base)?;
    let layer = open_layer(dir, d).map_err(|e| e.why)?;
    Ok(DiskSpec::restored(base, layer, d.map))
}

/// Opens and checks the snapshot's overlay file in `dir`.
pub fn open_layer(dir: &Path, d: &DiskSnapshot) -> Result<Arc<SnapshotLayer>, SnapshotError> {
    let file = super::restore::open_read(dir, &d.overlay.file)?;
    SnapshotLayer::open(file, &d.overlay.layer_facts())
        .map_err(|e| SnapshotError::new(dir, format!("{}: {e}", d.overlay.file)))
}

#[cfg(test)]
mod tests;
