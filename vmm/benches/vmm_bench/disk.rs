//! Group 12, the copy-on-write disk (no KVM needed): 4 KiB requests through the virtio-blk
//! device's whole path (descriptor chain in guest memory, `QueueNotify` on the MMIO register,
//! request parsing, the disk, the used ring), driven by the test driver the device's tests use,
//! against `pread` of the same offsets of the base image, in the same run:
//!
//! - sequential and random 4 KiB reads of untouched blocks (served from the base image);
//! - first 4 KiB writes (the overlay takes a new block: in memory, or a sparse file) and
//!   overwrites, against reads of the same blocks through the device.
//!
//! - the mechanism alone: mapping a base page copy-on-write (`mmap MAP_FIXED|MAP_PRIVATE` of
//!   the base file) over a page of an anonymous region and reading it, against `pread` of it
//!   into the page; and the first write to such a page (a copy-on-write break) against a write
//!   to a page that holds a copy;
//! - `map=on` through the device: random 4 KiB reads whose base page is mapped into guest
//!   memory (then one byte of it read, as the guest would), against the same reads copied;
//! - machine pages that N VMs (N = 1, 2, 4, 8 devices, each with guest memory of its own)
//!   hold after each read the same 1,024 random base blocks into 1,024 guest pages: distinct
//!   page frames behind those guest pages (`/proc/self/pagemap`, needs root), mapped vs copied.
//!   The base's page-cache pages exist in both cases and are not counted.
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
use mirrorball_devices::virtio_blk::map::map_budget;
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

/// Nanoseconds per request for `blocks` read through the device into the one data page, then
/// one byte of the page read (the guest looking at what it read: for a mapped page, the fault
/// that brings the page-cache page in).
fn device_reads_touched(driver: &mut TestDriver, blocks: &[u64]) -> Result<f64> {
    use vm_memory::Bytes;
    let buf = vm_memory::GuestAddress(mirrorball_devices::virtio_blk::test_driver::DATA + 0x1000);
    let mut sum = 0u8;
    let start = Instant::now();
    for &b in blocks {
        let (status, _) = driver.request(VIRTIO_BLK_T_IN, b * 8, REQUEST);
        anyhow::ensure!(status == 0, "read of block {b} failed: status {status}");
        sum = sum.wrapping_add(driver.mem.read_obj::<u8>(buf)?);
    }
    std::hint::black_box(sum);
    Ok(start.elapsed().as_nanos() as f64 / blocks.len() as f64)
}

/// Distinct page frames behind `pages` guest pages from `first` of each driver; `None` when
/// pagemap hides frame numbers (not root).
fn machine_pages(drivers: &[TestDriver], first: u64, pages: u64) -> Result<Option<u64>> {
    use vm_memory::GuestMemoryBackend;
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut frames = std::collections::HashSet::new();
    for d in drivers {
        for i in 0..pages {
            let host = d
                .mem
                .get_host_address(vm_memory::GuestAddress(first + i * 4096))?
                as u64;
            let mut entry = [0u8; 8];
            pagemap.read_exact_at(&mut entry, host / 4096 * 8)?;
            let pfn = u64::from_le_bytes(entry) & ((1 << 55) - 1);
            if pfn == 0 {
                return Ok(None);
            }
            frames.insert(pfn);
        }
    }
    Ok(Some(frames.len() as u64))
}

/// Machine pages N VMs hold after each read the same `blocks` into guest pages of their own
/// (every page then read once, as a guest would): (mapped, copied).
fn sharing_for(base: &Arc<BaseImage>, n: usize, blocks: &[u64]) -> Result<Option<(u64, u64)>> {
    use vm_memory::Bytes;
    const FIRST: u64 = 1 << 20;
    let mut out = [0u64; 2];
    for (slot, map) in [true, false].into_iter().enumerate() {
        let mut drivers = Vec::with_capacity(n);
        for _ in 0..n {
            let disk = CowDisk::new(base.clone(), &OverlaySpec::Memory)?;
            let mut d = if map {
                TestDriver::with_mapping(disk, map_budget(n)).0
            } else {
                TestDriver::new(disk)
            };
            for (i, &b) in blocks.iter().enumerate() {
                let gpa = FIRST + i as u64 * 4096;
                anyhow::ensure!(d.read_to(b * 8, REQUEST, gpa) == 0, "read of block {b}");
                let _: u8 = d.mem.read_obj(vm_memory::GuestAddress(gpa))?;
            }
            drivers.push(d);
        }
        match machine_pages(&drivers, FIRST, blocks.len() as u64)? {
            Some(pages) => out[slot] = pages,
            None => return Ok(None),
        }
    }
    Ok(Some((out[0], out[1])))
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
    // map=on through the device: the same random reads, mapped vs copied.
    let mut mapper = TestDriver::with_mapping(
        CowDisk::new(base.clone(), &OverlaySpec::Memory)?,
        u64::MAX, // one guest page remapped over and over: no VMA growth
    )
    .0;
    let (mut dev_map, mut dev_copy) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let blocks = random_blocks(REQUESTS, 2000 + round as u64);
        dev_map.push(device_reads_touched(&mut mapper, &blocks)?);
        dev_copy.push(device_reads_touched(&mut reader, &blocks)?);
    }
    let mapped_pages = mapper.dev.backend().metrics().mapped_pages();
    anyhow::ensure!(
        mapped_pages == REQUESTS * ROUNDS as u64,
        "only {mapped_pages} reads were mapped"
    );
    // 1,024 distinct blocks spread over the image (7,919 is prime: i ↦ 7,919·i is one-to-one).
    let shared_blocks: Vec<u64> = (0..1024u64)
        .map(|i| i * 7919 % (BASE_BYTES / u64::from(REQUEST)))
        .collect();
    let mut sharing = Vec::new();
    for n in [1usize, 2, 4, 8] {
        sharing.push((n, sharing_for(&base, n, &shared_blocks)?));
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
    let mut rows = vec![
        Row::measured(
            12,
            "disk_map_read",
            "map=on: random 4 KiB base reads mapped into guest memory (then one byte read) vs the same reads copied",
            "µs/request",
            us(&dev_map),
            "copied (map=off)",
            Some(us(&dev_copy)),
            Target::None,
            format!("{}; KVM's invalidation of the guest mapping (MMU notifier) comes on top on a real VM", note(&dev_map)),
        ),
    ];
    for (n, pages) in sharing {
        let name = format!("disk_map_machine_pages_{n}vm");
        rows.push(match pages {
            Some((mapped, copied)) => Row::measured(
                12,
                &name,
                &format!("machine pages {n} VM(s) hold after reading the same 1,024 base blocks: map=on vs copied"),
                "pages",
                mapped as f64,
                "copied",
                Some(copied as f64),
                Target::None,
                format!("distinct page frames behind the guest pages; saved: {} pages ({} KiB per VM)", copied.saturating_sub(mapped), copied.saturating_sub(mapped) * 4 / n as u64),
            ),
            None => Row::skipped(12, &name, &name, Target::None, "page frame numbers need root".into()),
        });
    }
    rows.extend(vec![
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
            "the mechanism alone: map a base page copy-on-write over a backed page and read it vs pread into it",
            "µs/page",
            us(&map),
            "pread into the page",
            Some(us(&copy)),
            Target::None,
            format!("{pages} random pages × {ROUNDS} rounds (mmap MAP_FIXED|MAP_PRIVATE of the base file, one VMA each)"),
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
    ]);
    Ok(rows)
}
