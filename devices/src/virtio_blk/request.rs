//! One virtio-blk request (virtio 1.2, §5.2.6): parsing a descriptor chain
//! the guest wrote, executing it against a [`CowDisk`], and writing the
//! status byte.
//!
//! A request is a chain of device-readable descriptors (the 16-byte header
//! `{type: u32, reserved: u32, sector: u64}`, then for `OUT` the data),
//! followed by device-writable ones (for `IN` and `GET_ID` the data, then
//! the one-byte status, which is the last byte of the last descriptor).
//! The header and data may be split across descriptors any way the driver
//! likes (virtio 1.x implies `VIRTIO_F_ANY_LAYOUT`).
//!
//! Everything is guest input. A chain is *malformed*, gets no status and is
//! returned with used length 0, when it is longer than
//! [`MAX_DESCRIPTORS`], holds a zero-length descriptor, a descriptor outside
//! guest memory, a readable descriptor after a writable one, or no writable
//! byte for the status. A well-formed chain whose request is wrong (a short
//! header, data that is not a whole number of sectors or larger than
//! [`MAX_REQUEST_BYTES`], sectors past the disk's end, data in the wrong
//! direction) gets `VIRTIO_BLK_S_IOERR`; an unknown type gets
//! `VIRTIO_BLK_S_UNSUPP`.
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::disk::{CowDisk, BLOCK_SIZE, SECTOR_SIZE};
use super::map::{BaseMapper, PAGE_SIZE};
use super::DiskMetrics;

/// Request type: read sectors into the guest.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write sectors from the guest.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush volatile caches.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: the device's ID string (20 bytes).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the request header.
pub const HEADER_LEN: u64 = 16;
/// Length of a `GET_ID` answer.
pub const ID_LEN: usize = 20;
/// Most data bytes one request may carry (larger ones fail with `IOERR`).
/// The device announces `seg_max` and `size_max` so that a driver following
/// them stays below it.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Most descriptors one chain may have (an indirect table may be longer
/// than the queue).
pub const MAX_DESCRIPTORS: usize = 260;

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes (non-zero).
    pub len: u64,
}

/// A chain split into its readable and writable parts.
#[derive(Debug, Default)]
struct Chain {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| s.len).sum()
}

/// Splits `descriptors` (guest-physical address, length, device-writable)
/// into readable and writable segments; `None` if the chain is malformed.
fn split<M: GuestMemory>(
    mem: &M,
    descriptors: impl Iterator<Item = (u64, u32, bool)>,
) -> Option<Chain> {
    let mut chain = Chain::default();
    for (count, (addr, len, writable)) in descriptors.enumerate() {
        let addr = GuestAddress(addr);
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let in_memory = usize::try_from(len).is_ok_and(|l| mem.check_range(addr, l, access));
        if count >= MAX_DESCRIPTORS || len == 0 || !in_memory {
            return None;
        }
        let segment = Segment {
            addr,
            len: u64::from(len),
        };
        if writable {
            chain.writable.push(segment);
        } else if chain.writable.is_empty() {
            chain.readable.push(segment);
        } else {
            return None;
        }
    }
    (!chain.writable.is_empty()).then_some(chain)
}

/// Segments covering bytes `skip..skip + len` of `segments`.
fn sub_range(segments: &[Segment], mut skip: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segments {
        if len == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(len);
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + skip),
            len: take,
        });
        skip = 0;
        len -= take;
    }
    out
}

/// Copies guest bytes of `segments` into `buf` (same total length).
fn gather<M: GuestMemory>(mem: &M, segments: &[Segment], buf: &mut [u8]) -> Option<()> {
    let mut at = 0usize;
    for s in segments {
        let len = usize::try_from(s.len).ok()?;
        mem.read_slice(buf.get_mut(at..at + len)?, s.addr).ok()?;
        at += len;
    }
    Some(())
}

/// Copies `buf` into the guest buffers of `segments` (same total length).
fn scatter<M: GuestMemory>(mem: &M, segments: &[Segment], buf: &[u8]) -> Option<()> {
    let mut at = 0usize;
    for s in segments {
        let len = usize::try_from(s.len).ok()?;
        mem.write_slice(buf.get(at..at + len)?, s.addr).ok()?;
        at += len;
    }
    Some(())
}

/// Executes one request chain against `disk`; returns the used length
/// (bytes written into guest memory, status included). `scratch` is a
/// reusable bounce buffer, `id` the `GET_ID` answer; with a `mapper`, reads
/// map whole base pages into guest memory instead of copying them (see
/// [`super::map`]).
pub fn execute<M: GuestMemory>(
    mem: &M,
    descriptors: impl Iterator<Item = (u64, u32, bool)>,
    disk: &mut CowDisk,
    io: Io<'_>,
    metrics: &DiskMetrics,
) -> u32 {
    let Some(chain) = split(mem, descriptors) else {
        DiskMetrics::bump(&metrics.malformed);
        return 0;
    };
    // `split` guarantees a non-empty last writable segment.
    let Some(last) = chain.writable.last() else {
        return 0;
    };
    let status_addr = GuestAddress(last.addr.0 + last.len - 1);
    let out_len = total(&chain.writable) - 1;
    let data_out = sub_range(&chain.writable, 0, out_len);
    let (status, written) = run(mem, &chain, &data_out, out_len, disk, io, metrics);
    if status == VIRTIO_BLK_S_IOERR {
        DiskMetrics::bump(&metrics.io_errors);
    }
    if mem.write_obj(status, status_addr).is_err() {
        // Checked by `split`; only a racing memory change could get here.
        DiskMetrics::bump(&metrics.malformed);
        return 0;
    }
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// What a request may use besides the disk: the `GET_ID` answer, a reusable
/// bounce buffer, and the mapper of base pages (`map=on`), if any.
#[derive(Debug)]
pub struct Io<'a> {
    /// The `GET_ID` answer.
    pub id: &'a [u8; ID_LEN],
    /// Bounce buffer.
    pub scratch: &'a mut Vec<u8>,
    /// Maps base pages into guest memory instead of copying them.
    pub mapper: Option<&'a mut BaseMapper>,
}

/// Reads `len` disk bytes at `offset` into the guest buffers `data_out`,
/// mapping the base's pages where the mapper can and copying the rest.
fn read_into<M: GuestMemory>(
    mem: &M,
    data_out: &[Segment],
    offset: u64,
    disk: &CowDisk,
    mapper: &mut BaseMapper,
    scratch: &mut Vec<u8>,
    metrics: &DiskMetrics,
) -> Option<()> {
    let mut pos = offset;
    for s in data_out {
        let end = s.addr.0.checked_add(s.len)?;
        let mut at = s.addr.0;
        while at < end {
            // A run of whole pages, aligned in the guest and on the disk, that the overlay
            // does not hold (nor a snapshot layer under it): mapped if the mapper can.
            let mut run = 0;
            if at.is_multiple_of(PAGE_SIZE) && pos.is_multiple_of(BLOCK_SIZE) {
                while at + run + PAGE_SIZE <= end && disk.from_base((pos + run) / BLOCK_SIZE) {
                    run += PAGE_SIZE;
                }
            }
            if run > 0 && mapper.map(GuestAddress(at), pos, run, &metrics.map) {
                at += run;
                pos += run;
                continue;
            }
            // Otherwise copy up to the next page boundary (a whole page when aligned).
            let step = (run.max(PAGE_SIZE - at % PAGE_SIZE)).min(end - at);
            let len = usize::try_from(step).ok()?;
            scratch.resize(len, 0);
            disk.read(pos, scratch).ok()?;
            mem.write_slice(scratch, GuestAddress(at)).ok()?;
            at += step;
            pos += step;
        }
    }
    Some(())
}

/// The request's status and the data bytes written into the guest.
fn run<M: GuestMemory>(
    mem: &M,
    chain: &Chain,
    data_out: &[Segment],
    out_len: u64,
    disk: &mut CowDisk,
    io: Io<'_>,
    metrics: &DiskMetrics,
) -> (u8, u64) {
    let Io {
        id,
        scratch,
        mapper,
    } = io;
    const FAIL: (u8, u64) = (VIRTIO_BLK_S_IOERR, 0);
    let in_len = total(&chain.readable);
    if in_len < HEADER_LEN {
        return FAIL;
    }
    let mut header = [0u8; 16];
    if gather(mem, &sub_range(&chain.readable, 0, HEADER_LEN), &mut header).is_none() {
        return FAIL;
    }
    let word = |range: std::ops::Range<usize>| -> u64 {
        header[range]
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    };
    let kind = word(0..4);
    let sector = word(8..16);
    let data_in_len = in_len - HEADER_LEN;
    // Where the data lives on the disk, if the request is in range.
    let disk_range = |len: u64| -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (len.is_multiple_of(SECTOR_SIZE) && len <= MAX_REQUEST_BYTES && end <= disk.capacity())
            .then_some(offset)
    };
    match u32::try_from(kind) {
        Ok(VIRTIO_BLK_T_IN) => {
            let Some(offset) = disk_range(out_len).filter(|_| data_in_len == 0) else {
                return FAIL;
            };
            if let Some(mapper) = mapper {
                if read_into(mem, data_out, offset, disk, mapper, scratch, metrics).is_none() {
                    return FAIL;
                }
            } else {
                let Ok(len) = usize::try_from(out_len) else {
                    return FAIL;
                };
                scratch.resize(len, 0);
                if disk.read(offset, scratch).is_err() || scatter(mem, data_out, scratch).is_none()
                {
                    return FAIL;
                }
            }
            DiskMetrics::bump(&metrics.reads);
            DiskMetrics::add(&metrics.read_bytes, out_len);
            (VIRTIO_BLK_S_OK, out_len)
        }
        Ok(VIRTIO_BLK_T_OUT) => {
            let Some(offset) = disk_range(data_in_len).filter(|_| out_len == 0) else {
                return FAIL;
            };
            let Ok(len) = usize::try_from(data_in_len) else {
                return FAIL;
            };
            scratch.resize(len, 0);
            let data = sub_range(&chain.readable, HEADER_LEN, data_in_len);
            if gather(mem, &data, scratch).is_none() || disk.write(offset, scratch).is_err() {
                return FAIL;
            }
            DiskMetrics::bump(&metrics.writes);
            DiskMetrics::add(&metrics.written_bytes, data_in_len);
            metrics.set_overlay_blocks(disk.overlay_blocks());
            (VIRTIO_BLK_S_OK, 0)
        }
        Ok(VIRTIO_BLK_T_FLUSH) => {
            // The overlay is private and lives no longer than the VM (or is
            // a scratch file): nothing to make durable, and a vCPU must not
            // wait on fsync.
            DiskMetrics::bump(&metrics.flushes);
            (VIRTIO_BLK_S_OK, 0)
        }
        Ok(VIRTIO_BLK_T_GET_ID) => {
            let n = out_len.min(ID_LEN as u64);
            let answer = &id[..usize::try_from(n).unwrap_or(0)];
            if scatter(mem, &sub_range(data_out, 0, n), answer).is_none() {
                return FAIL;
            }
            (VIRTIO_BLK_S_OK, n)
        }
        _ => {
            DiskMetrics::bump(&metrics.unsupported);
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    }
}
