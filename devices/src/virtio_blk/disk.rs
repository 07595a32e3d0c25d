//! The copy-on-write disk behind a virtio-blk device: a read-only base image
//! that many VMs share, and a private overlay per VM.
//!
//! This module owns [`BaseImage`] (the base file, opened read-only and never
//! written; one `Arc` is shared by every VM of a process) and [`CowDisk`]
//! (one VM's view: the base plus its overlay). The overlay holds whole
//! blocks of [`BLOCK_SIZE`] bytes, tracked by a bitmap: a set bit means the
//! block lives in the overlay, a clear bit that it is read from the base. A
//! write to a block not yet in the overlay first copies the block from the
//! base (read-modify-write) unless it covers the whole block. The overlay is
//! either in memory (a map of blocks) or a sparse file of the disk's size
//! that only this VM uses (created `O_EXCL|O_NOFOLLOW`, mode 0600; block `n`
//! at offset `n * BLOCK_SIZE`).
//!
//! A disk restored from a snapshot has a third layer between the two: the snapshot's overlay,
//! read-only and shared by every clone ([`super::layer::SnapshotLayer`]). Reads look in the
//! VM's own overlay, then in that layer, then in the base; a first write copies the block from
//! the layer if it holds it, else from the base.
//!
//! Offsets and lengths given to [`CowDisk::read`] and [`CowDisk::write`] must
//! lie inside the disk (the request layer checks the guest's sector numbers
//! before calling); out-of-range calls fail with `InvalidInput` and touch
//! nothing.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::layer::SnapshotLayer;

/// Granularity of the overlay: the unit copied from the base on a first
/// write and tracked by one bitmap bit.
pub const BLOCK_SIZE: u64 = 4096;
/// The virtio-blk sector size; the base image's length must be a multiple.
pub const SECTOR_SIZE: u64 = 512;

/// Errors opening a disk's files.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The base image cannot be opened or examined.
    #[error("cannot open base image {path}: {source}")]
    OpenBase {
        /// The base image.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The base image is not a regular file.
    #[error("base image {0} is not a regular file")]
    NotAFile(PathBuf),
    /// The base image's length is zero or not a multiple of 512 bytes.
    #[error("base image {path} is {len} bytes, not a non-zero multiple of 512")]
    BadSize {
        /// The base image.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The overlay file cannot be created (it exists, is a symbolic link,
    /// or its directory is missing or not writable).
    #[error("cannot create overlay {path}: {source}")]
    CreateOverlay {
        /// The overlay file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A snapshot layer taken from a disk of another size.
    #[error("the snapshot's overlay is for a {layer}-byte disk, the base image has {base} bytes")]
    LayerSize {
        /// The layer's disk size.
        layer: u64,
        /// The base image's size.
        base: u64,
    },
}

/// A read-only base image, shared by every disk made from it.
#[derive(Debug)]
pub struct BaseImage {
    file: File,
    len: u64,
    path: PathBuf,
}

impl BaseImage {
    /// Opens `path` read-only. Its length must be a non-zero multiple of
    /// [`SECTOR_SIZE`].
    pub fn open(path: &Path) -> Result<Arc<Self>, DiskError> {
        let open_err = |source| DiskError::OpenBase {
            path: path.to_path_buf(),
            source,
        };
        // Non-blocking: a FIFO in its place is refused below instead of blocking the open.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile(path.to_path_buf()));
        }
        let len = meta.len();
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(DiskError::BadSize {
                path: path.to_path_buf(),
                len,
            });
        }
        Ok(Arc::new(Self {
            file,
            len,
            path: path.to_path_buf(),
        }))
    }

    /// Length in bytes (the disk's capacity).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: an empty base is refused by [`Self::open`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The open file (read-only).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills `buf` from `offset`. Bytes past the file's end (if it shrank
    /// after it was opened) read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Where a VM's overlay lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlaySpec {
    /// In the VMM's memory; gone when the VM ends.
    Memory,
    /// A new sparse file at this path (it must not exist).
    File(PathBuf),
}

#[derive(Debug)]
enum OverlayStore {
    Memory(HashMap<u64, Box<[u8]>>),
    File(File),
}

/// One VM's copy-on-write view of a base image.
#[derive(Debug)]
pub struct CowDisk {
    base: Arc<BaseImage>,
    /// A snapshot's overlay, between the base and this VM's overlay.
    layer: Option<Arc<SnapshotLayer>>,
    store: OverlayStore,
    /// One bit per block: set when the block lives in the overlay.
    bitmap: Vec<u64>,
    overlay_blocks: u64,
}

/// A length or offset known to be at most a slice's length (or
/// [`BLOCK_SIZE`]) as `usize`.
#[allow(clippy::cast_possible_truncation)]
fn fits(n: u64) -> usize {
    n as usize
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

impl CowDisk {
    /// A disk over `base` with a fresh, empty overlay.
    pub fn new(base: Arc<BaseImage>, overlay: &OverlaySpec) -> Result<Self, DiskError> {
        let store = match overlay {
            OverlaySpec::Memory => OverlayStore::Memory(HashMap::new()),
            OverlaySpec::File(path) => {
                let create_err = |source| DiskError::CreateOverlay {
                    path: path.clone(),
                    source,
                };
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(create_err)?;
                file.set_len(base.len()).map_err(create_err)?;
                OverlayStore::File(file)
            }
        };
        let blocks = base.len().div_ceil(BLOCK_SIZE);
        let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX);
        Ok(Self {
            base,
            layer: None,
            store,
            bitmap: vec![0; words],
            overlay_blocks: 0,
        })
    }

    /// A disk over `base` with `layer` (a snapshot's overlay) above it and a fresh, empty
    /// overlay on top.
    pub fn layered(
        base: Arc<BaseImage>,
        layer: Arc<SnapshotLayer>,
        overlay: &OverlaySpec,
    ) -> Result<Self, DiskError> {
        if layer.capacity() != base.len() {
            return Err(DiskError::LayerSize {
                layer: layer.capacity(),
                base: base.len(),
            });
        }
        let mut disk = Self::new(base, overlay)?;
        disk.layer = Some(layer);
        Ok(disk)
    }

    /// The snapshot layer, if the disk was restored over one.
    pub fn layer(&self) -> Option<&Arc<SnapshotLayer>> {
        self.layer.as_ref()
    }

    /// Whether block `block` is read from the base image (neither this VM's overlay nor a
    /// snapshot layer holds it).
    pub fn from_base(&self, block: u64) -> bool {
        !self.in_overlay(block) && !self.layer.as_ref().is_some_and(|l| l.holds(block))
    }

    /// Every block held above the base (in this VM's overlay or the snapshot layer), ascending.
    pub fn held_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.capacity().div_ceil(BLOCK_SIZE)).filter(|&b| !self.from_base(b))
    }

    /// The base image.
    pub fn base(&self) -> &Arc<BaseImage> {
        &self.base
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.base.len()
    }

    /// Blocks written so far (held by the overlay).
    pub fn overlay_blocks(&self) -> u64 {
        self.overlay_blocks
    }

    /// Whether block `block` lives in the overlay.
    pub fn in_overlay(&self, block: u64) -> bool {
        let word = usize::try_from(block / 64).ok();
        word.and_then(|w| self.bitmap.get(w))
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    fn mark(&mut self, block: u64) {
        if let Some(w) = usize::try_from(block / 64)
            .ok()
            .and_then(|w| self.bitmap.get_mut(w))
        {
            if *w & (1 << (block % 64)) == 0 {
                *w |= 1 << (block % 64);
                self.overlay_blocks += 1;
            }
        }
    }

    /// Length of block `block` (the last one may be short).
    fn block_len(&self, block: u64) -> usize {
        let start = block * BLOCK_SIZE;
        // At most BLOCK_SIZE: fits.
        (self.capacity().saturating_sub(start)).min(BLOCK_SIZE) as usize
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<u64> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.capacity())
            .ok_or_else(|| invalid("access past the end of the disk"))?;
        Ok(end)
    }

    /// Fills `buf` with the disk's bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = self.check(offset, buf.len())?;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let from = usize::try_from(pos - offset).map_err(|_| invalid("offset"))?;
            if self.in_overlay(block) {
                let stop = ((block + 1) * BLOCK_SIZE).min(end);
                let to = from + fits(stop - pos);
                self.read_overlay(block, pos, &mut buf[from..to])?;
                pos = stop;
            } else if let Some(layer) = self.layer.as_ref().filter(|l| l.holds(block)) {
                let stop = ((block + 1) * BLOCK_SIZE).min(end);
                let to = from + fits(stop - pos);
                layer.read_at(&mut buf[from..to], pos)?;
                pos = stop;
            } else {
                // One base read for the whole run of untouched blocks.
                let mut next = block + 1;
                while next * BLOCK_SIZE < end && self.from_base(next) {
                    next += 1;
                }
                let stop = (next * BLOCK_SIZE).min(end);
                let to = from + fits(stop - pos);
                self.base.read_at(&mut buf[from..to], pos)?;
                pos = stop;
            }
        }
        Ok(())
    }

    /// Reads from an overlay block: `pos` is a disk offset inside `block`.
    fn read_overlay(&self, block: u64, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.store {
            OverlayStore::Memory(blocks) => {
                let data = blocks
                    .get(&block)
                    .ok_or_else(|| io::Error::other("overlay block missing"))?;
                let at = fits(pos - block * BLOCK_SIZE);
                let src = data
                    .get(at..at + buf.len())
                    .ok_or_else(|| invalid("overlay block range"))?;
                buf.copy_from_slice(src);
                Ok(())
            }
            OverlayStore::File(file) => file.read_exact_at(buf, pos),
        }
    }

    /// Writes `data` at `offset`, into the overlay only.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = self.check(offset, data.len())?;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let block_start = block * BLOCK_SIZE;
            let stop = (block_start + BLOCK_SIZE).min(end);
            let from = usize::try_from(pos - offset).map_err(|_| invalid("offset"))?;
            let part = &data[from..from + fits(stop - pos)];
            self.write_block(block, pos, part)?;
            pos = stop;
        }
        Ok(())
    }

    /// Writes `part` at disk offset `pos` inside `block`.
    fn write_block(&mut self, block: u64, pos: u64, part: &[u8]) -> io::Result<()> {
        let block_start = block * BLOCK_SIZE;
        let block_len = self.block_len(block);
        let at = fits(pos - block_start);
        let present = self.in_overlay(block);
        let whole = at == 0 && part.len() == block_len;
        // A first write copies the rest of the block from the base (unless it
        // covers the whole block).
        let fresh = if present {
            None
        } else {
            let mut buf = vec![0u8; block_len];
            if !whole {
                match self.layer.as_ref().filter(|l| l.holds(block)) {
                    Some(layer) => layer.read_at(&mut buf, block_start)?,
                    None => self.base.read_at(&mut buf, block_start)?,
                }
            }
            buf.get_mut(at..at + part.len())
                .ok_or_else(|| invalid("overlay block range"))?
                .copy_from_slice(part);
            Some(buf)
        };
        match (&mut self.store, fresh) {
            (OverlayStore::Memory(blocks), Some(buf)) => {
                blocks.insert(block, buf.into_boxed_slice());
            }
            (OverlayStore::Memory(blocks), None) => blocks
                .get_mut(&block)
                .and_then(|data| data.get_mut(at..at + part.len()))
                .ok_or_else(|| invalid("overlay block range"))?
                .copy_from_slice(part),
            (OverlayStore::File(file), Some(buf)) => file.write_all_at(&buf, block_start)?,
            (OverlayStore::File(file), None) => file.write_all_at(part, pos)?,
        }
        self.mark(block);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_file(dir: &Path, len: usize) -> PathBuf {
        let path = dir.join("base.img");
        let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mb-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn partial_writes_keep_the_rest_of_the_block_and_never_touch_the_base() {
        let dir = tempdir("partial");
        // 2.5 blocks: the last block is short.
        let path = base_file(&dir, 10 * 1024);
        let before = std::fs::read(&path).unwrap();
        let base = BaseImage::open(&path).unwrap();
        for spec in [OverlaySpec::Memory, OverlaySpec::File(dir.join("ov"))] {
            let mut disk = CowDisk::new(base.clone(), &spec).unwrap();
            disk.write(4096 + 512, &[0xee; 512]).unwrap();
            disk.write(8192 + 1024, &[0xdd; 1024]).unwrap();
            assert_eq!(disk.overlay_blocks(), 2);
            assert!(!disk.in_overlay(0) && disk.in_overlay(1) && disk.in_overlay(2));
            let mut all = vec![0; 10 * 1024];
            disk.read(0, &mut all).unwrap();
            let mut want = before.clone();
            want[4096 + 512..4096 + 1024].fill(0xee);
            want[8192 + 1024..8192 + 2048].fill(0xdd);
            assert_eq!(all, want);
            // Overwriting part of an overlay block.
            disk.write(4096, &[1; 512]).unwrap();
            let mut first = vec![0; 1024];
            disk.read(4096, &mut first).unwrap();
            assert_eq!(&first[..512], &[1; 512][..]);
            assert_eq!(&first[512..], &[0xee; 512][..]);
            assert!(disk.write(10 * 1024 - 512, &[0; 1024]).is_err());
            assert!(disk.read(u64::MAX - 10, &mut [0; 512]).is_err());
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(CowDisk::new(base, &OverlaySpec::File(dir.join("ov"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_bad_base_images() {
        let dir = tempdir("bad");
        let odd = dir.join("odd.img");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        assert!(matches!(
            BaseImage::open(&odd),
            Err(DiskError::BadSize { len: 1000, .. })
        ));
        let empty = dir.join("empty.img");
        std::fs::write(&empty, []).unwrap();
        assert!(matches!(
            BaseImage::open(&empty),
            Err(DiskError::BadSize { len: 0, .. })
        ));
        assert!(matches!(
            BaseImage::open(&dir.join("missing")),
            Err(DiskError::OpenBase { .. })
        ));
        assert!(matches!(BaseImage::open(&dir), Err(DiskError::NotAFile(_))));
        // A FIFO with no writer: refused, not waited on.
        let fifo = dir.join("fifo.img");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads one NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            BaseImage::open(&fifo),
            Err(DiskError::NotAFile(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
