//! Group 12, the copy-on-write disk (no KVM needed): 4 KiB requests through the virtio-blk
//! device's whole path (descriptor chain in guest memory, `QueueNotify` on the MMIO register,
//! request parsing, the disk, the used ring), driven by the test driver the device's tests use,
//! against `pread` of the same offsets of the base image, in the same run:
//!
//! - sequential and random 4 KiB reads of untouched blocks (served from the base image);
//! - first 4 KiB writes (the overlay takes a new block: in memory, or a sparse file) and
//!   overwrites, against reads of the same blocks through the device.
//!
//! The base image (64 MiB) is read once first, so every figure is page-cache speed: the device's
//! own cost, not the disk's. Each figure is the median of interleaved rounds.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use mirrorball_devices::virtio_blk::disk::{BaseImage, CowDisk, OverlaySpec};
use mirrorball_devices::virtio_blk::request::VIRTIO_BLK_T_IN;
use mirrorball_devices::virtio_blk::test_driver::TestDriver;

use super::report::{median, spread, Row, Target};

const BASE_BYTES: u64 = 64 << 20;
const REQUEST: u32 = 4096;
const REQUESTS: u64 = 4096;
const ROUNDS: usize = 7;

/// xorshift64*: the random offsets.
fn random_blocks(n: u64, seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d) % (BASE_BYTES / u64::from(REQUEST))
        })
        .collect()
}

/// Nanoseconds per request for `blocks` read through the device.
fn device_reads(driver: &mut TestDriver, blocks: &[u64]) -> Result<f64> {
    let start = Instant::now();
    for &b in blocks {
        let (status, _) = driver.request(VIRTIO_BLK_T_IN, b * 8, REQUEST);
        anyhow::ensure!(status == 0, "read of block {b} failed: status {status}");
    }
    Ok(start.elapsed().as_nanos() as f64 / blocks.len() as f64)
}

/// Nanoseconds per request for `blocks` written through the device.
fn device_writes(driver: &mut TestDriver, blocks: &[u64], data: &[u8]) -> Result<f64> {
    let start = Instant::now();
    for &b in blocks {
        let status = driver.write_disk(b * 8, data);
        anyhow::ensure!(status == 0, "write of block {b} failed: status {status}");
    }
    Ok(start.elapsed().as_nanos() as f64 / blocks.len() as f64)
}

/// Nanoseconds per `pread` of 4 KiB at `blocks` of the base image.
fn preads(file: &File, blocks: &[u64]) -> Result<f64> {
    let mut buf = vec![0u8; REQUEST as usize];
    let start = Instant::now();
    for &b in blocks {
        file.read_exact_at(&mut buf, b * u64::from(REQUEST))?;
    }
    Ok(start.elapsed().as_nanos() as f64 / blocks.len() as f64)
}

fn base_image(dir: &Path) -> Result<std::path::PathBuf> {
    let path = dir.join("disk-bench-base.img");
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let file = File::create(&path).context("creating the base image")?;
    for i in 0..(BASE_BYTES >> 20) {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all_at(&block, i << 20)?;
    }
    Ok(path)
}

/// Runs the group in `dir` (a scratch directory).
pub fn run(dir: &Path) -> Result<Vec<Row>> {
    let path = base_image(dir)?;
    let base: Arc<BaseImage> = BaseImage::open(&path).context("opening the base image")?;
    let file = File::open(&path)?;
    let all: Vec<u64> = (0..BASE_BYTES / u64::from(REQUEST)).collect();
    preads(&file, &all)?; // warm the page cache
    let seq: Vec<u64> = (0..REQUESTS).collect();
    let rand = random_blocks(REQUESTS, 7);
    let data = vec![0x5au8; REQUEST as usize];

    let mut reader = TestDriver::new(CowDisk::new(base.clone(), &OverlaySpec::Memory)?);
    let (mut seq_dev, mut seq_pread, mut rand_dev, mut rand_pread) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut first_mem, mut first_file, mut overwrite, mut read_same) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        seq_dev.push(device_reads(&mut reader, &seq)?);
        seq_pread.push(preads(&file, &seq)?);
        rand_dev.push(device_reads(&mut reader, &rand)?);
        rand_pread.push(preads(&file, &rand)?);
        // Fresh overlays each round, so every write is a first write to its block.
        let blocks = random_blocks(REQUESTS, 100 + round as u64);
        let mut mem = TestDriver::new(CowDisk::new(base.clone(), &OverlaySpec::Memory)?);
        first_mem.push(device_writes(&mut mem, &blocks, &data)?);
        overwrite.push(device_writes(&mut mem, &blocks, &data)?);
        read_same.push(device_reads(&mut reader, &blocks)?);
        let overlay = dir.join(format!("disk-bench-overlay-{round}"));
        let mut on_file = TestDriver::new(CowDisk::new(
            base.clone(),
            &OverlaySpec::File(overlay.clone()),
        )?);
        first_file.push(device_writes(&mut on_file, &blocks, &data)?);
        drop(on_file);
        std::fs::remove_file(&overlay)?;
    }
    let _ = std::fs::remove_file(&path);
    let us = |v: &[f64]| median(v) / 1000.0;
    let note = |v: &[f64]| {
        let us: Vec<f64> = v.iter().map(|n| n / 1000.0).collect();
        format!(
            "median of {ROUNDS} rounds × {REQUESTS} requests, {} µs",
            spread(&us, 2)
        )
    };
    Ok(vec![
        Row::measured(
            12,
            "disk_seq_read",
            "virtio-blk sequential 4 KiB reads (base blocks) vs pread of the base image",
            "µs/request",
            us(&seq_dev),
            "pread",
            Some(us(&seq_pread)),
            Target::None,
            note(&seq_dev),
        ),
        Row::measured(
            12,
            "disk_rand_read",
            "virtio-blk random 4 KiB reads (base blocks) vs pread of the base image",
            "µs/request",
            us(&rand_dev),
            "pread",
            Some(us(&rand_pread)),
            Target::None,
            note(&rand_dev),
        ),
        Row::measured(
            12,
            "disk_first_write_mem",
            "first 4 KiB write to a block (in-memory overlay) vs a read of it through the device",
            "µs/request",
            us(&first_mem),
            "device read",
            Some(us(&read_same)),
            Target::None,
            note(&first_mem),
        ),
        Row::measured(
            12,
            "disk_first_write_file",
            "first 4 KiB write to a block (sparse-file overlay) vs a read of it through the device",
            "µs/request",
            us(&first_file),
            "device read",
            Some(us(&read_same)),
            Target::None,
            note(&first_file),
        ),
        Row::measured(
            12,
            "disk_overwrite_mem",
            "4 KiB overwrite of an overlay block (in memory) vs a read through the device",
            "µs/request",
            us(&overwrite),
            "device read",
            Some(us(&read_same)),
            Target::None,
            note(&overwrite),
        ),
    ])
}
