//! Group 12, the copy-on-write disk (no KVM needed): 4 KiB requests through the virtio-blk
//! device's whole path (descriptor chain in guest memory, `QueueNotify` on the MMIO register,
//! request parsing, the disk, the used ring), driven by the test driver the device's tests use,
//! against `pread` of the same offsets of the base image, in the same run:
//!
//! - sequential and random 4 KiB reads of untouched blocks (served from the base image);
//! - first 4 KiB writes (the overlay takes a new block: in memory, or a sparse file) and
//!   overwrites, against reads of the same blocks through the device.
//!
//! - the mechanism behind the stretch goal, not wired into the device: mapping a base
//!   page copy-on-write (`mmap MAP_FIXED|MAP_PRIVATE` of the base file) over a page of an
//!   anonymous region and reading it, against `pread` of it into the page; and the first write
//!   to such a page (a copy-on-write break) against a write to a page that holds a copy.
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

/// An anonymous private region of `pages` 4 KiB pages, unmapped on drop.
struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    fn new(pages: usize) -> Result<Self> {
        let len = pages * 4096;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        anyhow::ensure!(
            ptr != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Nanoseconds per page to fill every page from the base at `blocks`: by `pread` (copy) or
    /// by mapping the base page copy-on-write over it and reading one byte (map).
    fn fill(&self, file: &File, blocks: &[u64], map: bool) -> Result<f64> {
        use std::os::fd::AsRawFd;
        let start = Instant::now();
        let mut sum = 0u8;
        for (i, &b) in blocks.iter().enumerate() {
            anyhow::ensure!((i + 1) * 4096 <= self.len, "region too small");
            // SAFETY: page i lies inside this region (checked above), which this struct owns.
            let page = unsafe { self.ptr.add(i * 4096) };
            let offset = libc::off_t::try_from(b * 4096)?;
            if map {
                // SAFETY: MAP_FIXED replaces page i of our own region only, with a private
                // read-write mapping of the (read-only opened) base file: writes copy the page.
                let got = unsafe {
                    libc::mmap(
                        page.cast(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED,
                        file.as_raw_fd(),
                        offset,
                    )
                };
                anyhow::ensure!(
                    got == page.cast(),
                    "mmap: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: page i is mapped and readable.
                sum = sum.wrapping_add(unsafe { page.read_volatile() });
            } else {
                // SAFETY: page i is 4096 writable bytes of our region.
                let n = unsafe { libc::pread(file.as_raw_fd(), page.cast(), 4096, offset) };
                anyhow::ensure!(n == 4096, "pread: {}", std::io::Error::last_os_error());
            }
        }
        std::hint::black_box(sum);
        Ok(start.elapsed().as_nanos() as f64 / blocks.len() as f64)
    }

    /// Nanoseconds per page to write one byte into each of the first `pages` pages.
    fn touch(&self, pages: usize) -> f64 {
        let start = Instant::now();
        for i in 0..pages.min(self.len / 4096) {
            // SAFETY: page i lies inside this region, mapped writable.
            unsafe { self.ptr.add(i * 4096).write_volatile(1) };
        }
        start.elapsed().as_nanos() as f64 / pages as f64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region this struct mapped (and the pages mapped over it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
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
    // The stretch goal's mechanism: map vs copy, then the first write to each page.
    let pages = 1024;
    let (mut copy, mut map, mut write_copy, mut write_map) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let blocks = random_blocks(pages as u64, 1000 + round as u64);
        let copied = Region::new(pages)?;
        let mapped = Region::new(pages)?;
        copied.touch(pages); // a guest page that is already backed, as guest RAM usually is
        mapped.touch(pages);
        copy.push(copied.fill(&file, &blocks, false)?);
        map.push(mapped.fill(&file, &blocks, true)?);
        write_copy.push(copied.touch(pages));
        write_map.push(mapped.touch(pages));
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
        Row::measured(
            12,
            "disk_map_vs_copy",
            "stretch-goal mechanism: map a base page copy-on-write over a backed page and read it vs pread into it",
            "µs/page",
            us(&map),
            "pread into the page",
            Some(us(&copy)),
            Target::None,
            format!("{pages} random pages × {ROUNDS} rounds (mmap MAP_FIXED|MAP_PRIVATE of the base file, one VMA each); not wired into the device"),
        ),
        Row::measured(
            12,
            "disk_map_first_write",
            "first write to a mapped base page (copy-on-write break) vs to a page holding a copy",
            "µs/page",
            us(&write_map),
            "write to a copied page",
            Some(us(&write_copy)),
            Target::None,
            format!("{pages} pages × {ROUNDS} rounds"),
        ),
    ])
}
