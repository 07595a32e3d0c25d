//! A snapshot's overlay as a shared, read-only middle layer of restored disks.
//!
//! This module owns [`SnapshotLayer`] and the overlay file format of a snapshot. When a VM with
//! a copy-on-write disk is snapshotted, every block its disk holds above the base (its own
//! overlay and, for a clone, the layer it was restored over) is written by [`write_layer`] into
//! a sparse file of the disk's size: block `n` at offset `n * BLOCK_SIZE`, every other byte a
//! hole. Which blocks it holds is recorded as runs of block numbers next to it (a block of
//! zeros the guest wrote is a held block too, so holes cannot tell), with a CRC-32 over
//! (block number, block bytes) of every held block in order.
//!
//! A restore opens the file once with [`SnapshotLayer::open`], which checks the size, the runs
//! and the CRC (reading every held block once), and every clone's [`CowDisk`] reads through it:
//! its own private overlay first, then this layer, then the base image. The layer is never
//! written, so one clone's writes are never seen by another clone or by the snapshot.
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::disk::{CowDisk, BLOCK_SIZE};

/// Most runs a layer may be described by (bounds what a snapshot's state file may ask for).
pub const MAX_RUNS: usize = 1 << 20;

/// What [`write_layer`] wrote, and what [`SnapshotLayer::open`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerFacts {
    /// The disk's capacity in bytes (the file's size).
    pub bytes: u64,
    /// Runs of held blocks: (first block, count), ascending, neither overlapping nor adjacent.
    pub runs: Vec<(u64, u64)>,
    /// Held blocks (the sum of the runs' counts).
    pub blocks: u64,
    /// CRC-32 over (block number, little-endian; block bytes) of every held block, in order.
    pub crc32: u32,
}

/// A snapshot's overlay file refused.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The file's size differs from the disk's.
    #[error("the overlay file has {found} bytes, the disk {expected} (truncated?)")]
    Size {
        /// The disk's capacity.
        expected: u64,
        /// The file's size.
        found: u64,
    },
    /// The runs are not ascending, overlap, are empty or lie past the disk's end.
    #[error("the overlay's block list is invalid: {0}")]
    Runs(String),
    /// The held blocks do not match their checksum.
    #[error("the overlay file does not match its checksum (corrupted)")]
    Checksum,
    /// Reading the file failed.
    #[error("cannot read the overlay file: {0}")]
    Io(#[from] io::Error),
}

/// A read-only middle layer: the blocks a snapshot's disk held, in its overlay file.
#[derive(Debug)]
pub struct SnapshotLayer {
    file: File,
    bytes: u64,
    bitmap: Vec<u64>,
    blocks: u64,
}

fn block_len(capacity: u64, block: u64) -> usize {
    // At most BLOCK_SIZE: fits.
    usize::try_from(capacity.saturating_sub(block * BLOCK_SIZE).min(BLOCK_SIZE)).unwrap_or(0)
}

fn crc_block(hasher: &mut crc32fast::Hasher, block: u64, data: &[u8]) {
    hasher.update(&block.to_le_bytes());
    hasher.update(data);
}

/// Runs of consecutive block numbers in an ascending sequence.
fn runs_of(blocks: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match runs.last_mut() {
            Some((start, count)) if *start + *count == b => *count += 1,
            _ => runs.push((b, 1)),
        }
    }
    runs
}

/// Writes every block `disk` holds above its base into `out` (new and empty) as a sparse file
/// of the disk's size, and syncs it.
pub fn write_layer(disk: &CowDisk, out: &File) -> io::Result<LayerFacts> {
    let capacity = disk.capacity();
    out.set_len(capacity)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; usize::try_from(BLOCK_SIZE).unwrap_or(4096)];
    let held: Vec<u64> = disk.held_blocks().collect();
    for &block in &held {
        let data = &mut buf[..block_len(capacity, block)];
        disk.read(block * BLOCK_SIZE, data)?;
        out.write_all_at(data, block * BLOCK_SIZE)?;
        crc_block(&mut hasher, block, data);
    }
    out.sync_all()?;
    Ok(LayerFacts {
        bytes: capacity,
        runs: runs_of(held.iter().copied()),
        blocks: held.len() as u64,
        crc32: hasher.finalize(),
    })
}

impl SnapshotLayer {
    /// Opens a snapshot's overlay `file` described by `facts`: checks its size, the runs and
    /// the checksum of every held block.
    pub fn open(file: File, facts: &LayerFacts) -> Result<Arc<Self>, LayerError> {
        let found = file.metadata()?.len();
        if found != facts.bytes {
            return Err(LayerError::Size {
                expected: facts.bytes,
                found,
            });
        }
        let total = facts.bytes.div_ceil(BLOCK_SIZE);
        if facts.runs.len() > MAX_RUNS {
            return Err(LayerError::Runs(format!("more than {MAX_RUNS} runs")));
        }
        let words = usize::try_from(total.div_ceil(64))
            .map_err(|_| LayerError::Runs("the disk is too large".into()))?;
        let mut layer = Self {
            file,
            bytes: facts.bytes,
            bitmap: vec![0; words],
            blocks: 0,
        };
        let mut next_free = 0u64;
        for &(start, count) in &facts.runs {
            let end = start.checked_add(count).filter(|&e| e <= total);
            let Some(end) = end.filter(|_| count > 0 && start >= next_free) else {
                return Err(LayerError::Runs(format!(
                    "run ({start}, {count}) is empty, out of order or past block {total}"
                )));
            };
            for b in start..end {
                layer.bitmap[usize::try_from(b / 64).unwrap_or(0)] |= 1 << (b % 64);
            }
            layer.blocks += count;
            next_free = end;
        }
        if layer.blocks != facts.blocks {
            return Err(LayerError::Runs(format!(
                "the runs hold {} blocks, the count says {}",
                layer.blocks, facts.blocks
            )));
        }
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; usize::try_from(BLOCK_SIZE).unwrap_or(4096)];
        for &(start, count) in &facts.runs {
            for block in start..start + count {
                let data = &mut buf[..block_len(facts.bytes, block)];
                layer.file.read_exact_at(data, block * BLOCK_SIZE)?;
                crc_block(&mut hasher, block, data);
            }
        }
        if hasher.finalize() != facts.crc32 {
            return Err(LayerError::Checksum);
        }
        Ok(Arc::new(layer))
    }

    /// The disk's capacity it was taken from.
    pub fn capacity(&self) -> u64 {
        self.bytes
    }

    /// Blocks it holds.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether it holds block `block`.
    pub fn holds(&self, block: u64) -> bool {
        usize::try_from(block / 64)
            .ok()
            .and_then(|w| self.bitmap.get(w))
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Fills `buf` from disk offset `pos` (inside blocks it holds).
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, pos)
    }
}

#[cfg(test)]
mod tests;
