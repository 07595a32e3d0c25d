//! KVM binary statistics (`KVM_GET_STATS_FD`).
//!
//! Owns opening a stats fd for a VM or a vCPU, parsing its header and descriptors once, and
//! sampling its data block with one `pread` per sample.
//!
//! File layout (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"): a 24-byte header
//! `{flags, name_size, num_desc, id_offset, desc_offset, data_offset}` (native-endian `u32`s), an
//! id string of `name_size` bytes at `id_offset`, `num_desc` descriptors at `desc_offset` (each 16
//! bytes `{flags, exponent: i16, size: u16, offset: u32, bucket_size: u32}` followed by a
//! `name_size`-byte NUL-padded name), and the data block at `data_offset`: every stat is `size`
//! native-endian `u64`s starting `offset` bytes into the data block.
//!
//! Everything read from the fd is untrusted: sizes are capped ([`MAX_NAME_SIZE`],
//! [`MAX_DESCRIPTORS`], [`MAX_DATA_BYTES`]) before anything is allocated, every descriptor must be
//! 8-byte aligned and lie inside the data block actually present in the file, and short reads are
//! errors. Parsing never panics.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use kvm_bindings::{
    KVM_STATS_BASE_MASK, KVM_STATS_BASE_POW10, KVM_STATS_BASE_POW2, KVM_STATS_TYPE_CUMULATIVE,
    KVM_STATS_TYPE_INSTANT, KVM_STATS_TYPE_LINEAR_HIST, KVM_STATS_TYPE_LOG_HIST,
    KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK, KVM_STATS_UNIT_BOOLEAN, KVM_STATS_UNIT_BYTES,
    KVM_STATS_UNIT_CYCLES, KVM_STATS_UNIT_MASK, KVM_STATS_UNIT_NONE, KVM_STATS_UNIT_SECONDS,
};
use serde::Serialize;

use crate::Error;

/// Largest `name_size` accepted (the kernel uses 48).
pub const MAX_NAME_SIZE: u32 = 256;
/// Largest `num_desc` accepted (kernels expose well under 100 per fd).
pub const MAX_DESCRIPTORS: u32 = 4096;
/// Largest data block accepted, in bytes (the kernel's is a few hundred bytes).
pub const MAX_DATA_BYTES: u64 = 1 << 20;

const HEADER_SIZE: usize = 24;
const DESC_FIXED_SIZE: usize = 16;
const WORD: u64 = std::mem::size_of::<u64>() as u64;

mod ioctls {
    // `_IO(KVMIO, 0xce)`: valid on VM fds and vCPU fds, returns a new read-only fd.
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}

/// What a statistic measures over time (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatKind {
    /// Monotonic counter: deltas are meaningful.
    Cumulative,
    /// Current value (e.g. `pages_4k`).
    Instant,
    /// Highest value seen.
    Peak,
    /// Linear histogram (`bucket_size` wide buckets).
    LinearHist,
    /// Logarithmic (power-of-two) histogram.
    LogHist,
    /// A type this parser does not know (raw type bits).
    Unknown(u32),
}

impl StatKind {
    fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_TYPE_MASK {
            KVM_STATS_TYPE_CUMULATIVE => StatKind::Cumulative,
            KVM_STATS_TYPE_INSTANT => StatKind::Instant,
            KVM_STATS_TYPE_PEAK => StatKind::Peak,
            KVM_STATS_TYPE_LINEAR_HIST => StatKind::LinearHist,
            KVM_STATS_TYPE_LOG_HIST => StatKind::LogHist,
            other => StatKind::Unknown(other),
        }
    }

    /// True for the two histogram kinds.
    pub fn is_histogram(self) -> bool {
        matches!(self, StatKind::LinearHist | StatKind::LogHist)
    }
}

/// Unit of a statistic (`KVM_STATS_UNIT_*`), scaled by `base^exponent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatUnit {
    /// A plain count.
    None,
    /// Bytes.
    Bytes,
    /// Seconds (usually with exponent -9: nanoseconds).
    Seconds,
    /// CPU cycles.
    Cycles,
    /// 0 or 1.
    Boolean,
    /// Unknown unit bits (already shifted out of position, raw value).
    Unknown(u32),
}

impl StatUnit {
    fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_UNIT_MASK {
            KVM_STATS_UNIT_NONE => StatUnit::None,
            KVM_STATS_UNIT_BYTES => StatUnit::Bytes,
            KVM_STATS_UNIT_SECONDS => StatUnit::Seconds,
            KVM_STATS_UNIT_CYCLES => StatUnit::Cycles,
            KVM_STATS_UNIT_BOOLEAN => StatUnit::Boolean,
            other => StatUnit::Unknown(other),
        }
    }
}

/// Base of the exponent (`KVM_STATS_BASE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatBase {
    /// Value × 10^exponent.
    Pow10,
    /// Value × 2^exponent.
    Pow2,
    /// Unknown base bits (raw value).
    Unknown(u32),
}

impl StatBase {
    fn from_flags(flags: u32) -> Self {
        match flags & KVM_STATS_BASE_MASK {
            KVM_STATS_BASE_POW10 => StatBase::Pow10,
            KVM_STATS_BASE_POW2 => StatBase::Pow2,
            other => StatBase::Unknown(other),
        }
    }
}

/// One parsed, validated stats descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatDesc {
    /// Stat name (e.g. `exits`, `pf_taken`).
    pub name: String,
    /// Type bits of `flags`.
    pub kind: StatKind,
    /// Unit bits of `flags`.
    pub unit: StatUnit,
    /// Base bits of `flags`.
    pub base: StatBase,
    /// Unit exponent.
    pub exponent: i16,
    /// Byte offset into the data block (validated: 8-byte aligned, inside the block).
    pub offset: u32,
    /// Number of `u64` values (≥ 1; > 1 for histograms).
    pub size: u16,
    /// Bucket width for linear histograms.
    pub bucket_size: u32,
    /// The raw `flags` word.
    pub flags: u32,
}

impl StatDesc {
    /// The data-block words this stat's values occupy.
    pub fn word_range(&self) -> std::ops::Range<usize> {
        let start = (u64::from(self.offset) / WORD) as usize;
        start..start + usize::from(self.size)
    }

    /// This stat's values inside a data block read by [`StatsFd::read_into`]; `None` if `data`
    /// is too short (a buffer from another fd).
    pub fn values<'a>(&self, data: &'a [u64]) -> Option<&'a [u64]> {
        data.get(self.word_range())
    }

    /// This stat's first value (the value of a scalar stat).
    pub fn first(&self, data: &[u64]) -> Option<u64> {
        self.values(data).and_then(|v| v.first().copied())
    }
}

/// An open, parsed KVM binary-stats fd.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
    id: String,
    layout: Arc<[StatDesc]>,
    data_offset: u64,
    data_words: usize,
}

impl StatsFd {
    /// Opens the stats fd of a vCPU.
    pub fn for_vcpu(vcpu: &kvm_ioctls::VcpuFd) -> Result<Self, Error> {
        Self::from_file(get_stats_fd(vcpu)?)
    }

    /// Opens the stats fd of a VM.
    pub fn for_vm(vm: &kvm_ioctls::VmFd) -> Result<Self, Error> {
        Self::from_file(get_stats_fd(vm)?)
    }

    /// Parses the header and descriptors of a stats file (a real stats fd, or a crafted file in
    /// tests) and checks that the data block is readable.
    pub fn from_file(file: File) -> Result<Self, Error> {
        let mut raw = [0u8; HEADER_SIZE];
        read_exact(&file, 0, &mut raw, "header")?;
        let field = |i: usize| u32_at(&raw, i * 4).unwrap_or(0);
        let (name_size, num_desc) = (field(1), field(2));
        let (id_offset, desc_offset, data_offset) = (field(3), field(4), field(5));

        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(out_of_range("name_size", name_size, MAX_NAME_SIZE));
        }
        if num_desc > MAX_DESCRIPTORS {
            return Err(out_of_range("num_desc", num_desc, MAX_DESCRIPTORS));
        }
        for (field, value) in [
            ("id_offset", id_offset),
            ("desc_offset", desc_offset),
            ("data_offset", data_offset),
        ] {
            if (value as usize) < HEADER_SIZE {
                return Err(Error::HeaderOutOfRange {
                    field,
                    value: value.into(),
                    limit: HEADER_SIZE as u64,
                });
            }
        }

        // Bounded by the checks above: at most 256 bytes and 4096 * 272 bytes.
        let name_len = name_size as usize;
        let mut id = vec![0u8; name_len];
        read_exact(&file, id_offset.into(), &mut id, "id string")?;
        let id = c_string(&id);

        let stride = DESC_FIXED_SIZE + name_len;
        let mut block = vec![0u8; stride * num_desc as usize];
        read_exact(&file, desc_offset.into(), &mut block, "descriptors")?;

        let mut descs = Vec::with_capacity(num_desc as usize);
        let mut data_bytes = 0u64;
        for (index, raw) in block.chunks_exact(stride).enumerate() {
            let desc = parse_desc(index, raw)?;
            let end = u64::from(desc.offset) + u64::from(desc.size) * WORD;
            data_bytes = data_bytes.max(end);
            descs.push(desc);
        }

        // Every descriptor must lie inside the data block the file really has.
        // At most `u32::MAX * 9` bytes (offset plus size in words): fits a 64-bit `usize`.
        #[allow(clippy::cast_possible_truncation)]
        let mut data = vec![0u8; data_bytes as usize];
        let available = read_at_most(&file, data_offset.into(), &mut data, "data block")? as u64;
        if let Some((index, d)) = descs
            .iter()
            .enumerate()
            .find(|(_, d)| u64::from(d.offset) + u64::from(d.size) * WORD > available)
        {
            return Err(bad_desc(index, d, "extends past the end of the data block"));
        }

        Ok(StatsFd {
            file,
            id,
            layout: descs.into(),
            data_offset: data_offset.into(),
            data_words: (data_bytes / WORD) as usize,
        })
    }

    /// The fd's id string (e.g. `kvm-1234/vcpu-0`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// All descriptors, in file order.
    pub fn descriptors(&self) -> &[StatDesc] {
        &self.layout
    }

    /// Index of the first descriptor called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.layout.iter().position(|d| d.name == name)
    }

    /// Number of `u64` words in the data block (the length [`read_into`](Self::read_into) gives).
    pub fn data_words(&self) -> usize {
        self.data_words
    }

    /// Reads the whole data block with one `pread` into a new sample.
    pub fn read(&self) -> Result<StatsSample, Error> {
        let mut values = Vec::with_capacity(self.data_words);
        self.read_into(&mut values)?;
        Ok(StatsSample {
            layout: Arc::clone(&self.layout),
            values,
        })
    }

    /// Hot-path read: fills `buf` with the data block (resized to [`data_words`](Self::data_words);
    /// no allocation once `buf` has that capacity). Index it with [`StatDesc::first`]/`values`.
    pub fn read_into(&self, buf: &mut Vec<u64>) -> Result<(), Error> {
        self.read_words_into(0..self.data_words, buf)
    }

    /// Hotter path: like [`read_into`](Self::read_into), but reads only the data words
    /// `words` (one `pread`; e.g. the span of the few stats a caller needs). The other words
    /// of `buf` keep what they held (zero when new).
    pub fn read_words_into(
        &self,
        words: std::ops::Range<usize>,
        buf: &mut Vec<u64>,
    ) -> Result<(), Error> {
        buf.resize(self.data_words, 0);
        let Some(part) = buf.get_mut(words.clone()) else {
            return Err(Error::Truncated {
                what: "data block",
                offset: self.data_offset,
                len: words.end.saturating_mul(std::mem::size_of::<u64>()),
            });
        };
        let len = std::mem::size_of_val(part);
        // SAFETY: the pointer and length describe exactly the initialised memory of `part`, which
        // stays mutably borrowed for the slice's lifetime; `u8` has alignment 1 and every byte
        // pattern written into it is a valid `u64`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(part.as_mut_ptr().cast::<u8>(), len) };
        let offset = self.data_offset + words.start as u64 * WORD;
        read_exact(&self.file, offset, bytes, "data block")
    }
}

/// One sample of a stats fd's data block, with the descriptors to interpret it.
#[derive(Debug, Clone)]
pub struct StatsSample {
    layout: Arc<[StatDesc]>,
    values: Vec<u64>,
}

impl StatsSample {
    /// The descriptors of the fd this sample came from.
    pub fn descriptors(&self) -> &[StatDesc] {
        &self.layout
    }

    /// The raw data block.
    pub fn raw(&self) -> &[u64] {
        &self.values
    }

    /// First value of descriptor `index` (the value of a scalar stat); `None` if out of range.
    pub fn get(&self, index: usize) -> Option<u64> {
        self.layout.get(index)?.first(&self.values)
    }

    /// First value of the stat called `name`.
    pub fn get_by_name(&self, name: &str) -> Option<u64> {
        self.layout
            .iter()
            .find(|d| d.name == name)?
            .first(&self.values)
    }

    /// All values of descriptor `index` (the buckets of a histogram).
    pub fn values(&self, index: usize) -> Option<&[u64]> {
        self.layout.get(index)?.values(&self.values)
    }

    /// Scalar stats by name: the first value of every non-histogram descriptor (cumulative,
    /// instant, peak and unknown types). Histograms are skipped; read them with
    /// [`values`](Self::values).
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        self.scalars().map(|(d, v)| (d.name.clone(), v)).collect()
    }

    /// Change since `baseline`, by name, for scalar stats: cumulative stats give
    /// `self - baseline` (saturating at 0; a stat missing from the baseline counts from 0),
    /// instant, peak and unknown-type stats give their current value. Histograms are skipped.
    pub fn delta_since(&self, baseline: &StatsSample) -> BTreeMap<String, u64> {
        let same_layout = Arc::ptr_eq(&self.layout, &baseline.layout);
        self.scalars()
            .map(|(d, now)| {
                let value = if d.kind == StatKind::Cumulative {
                    let before = if same_layout {
                        baseline.values.get(d.word_range().start).copied()
                    } else {
                        baseline.get_by_name(&d.name)
                    };
                    now.saturating_sub(before.unwrap_or(0))
                } else {
                    now
                };
                (d.name.clone(), value)
            })
            .collect()
    }

    fn scalars(&self) -> impl Iterator<Item = (&StatDesc, u64)> {
        self.layout
            .iter()
            .filter(|d| !d.kind.is_histogram())
            .filter_map(|d| Some((d, d.first(&self.values)?)))
    }
}

fn get_stats_fd(fd: &impl AsRawFd) -> Result<File, Error> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and touches no user memory; `fd` is an open KVM
    // VM or vCPU fd borrowed for the duration of the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(fd, ioctls::KVM_GET_STATS_FD()) };
    if ret < 0 {
        return Err(Error::GetStatsFd(io::Error::last_os_error()));
    }
    // SAFETY: on success the ioctl returns a new fd that nothing else owns; the `File` takes
    // ownership and closes it on drop.
    Ok(unsafe { File::from_raw_fd(ret) })
}

fn parse_desc(index: usize, raw: &[u8]) -> Result<StatDesc, Error> {
    let flags = u32_at(raw, 0).unwrap_or(0);
    let exponent = raw
        .get(4..6)
        .map_or(0, |b| i16::from_ne_bytes([b[0], b[1]]));
    let size = raw
        .get(6..8)
        .map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]));
    let desc = StatDesc {
        name: c_string(raw.get(DESC_FIXED_SIZE..).unwrap_or(&[])),
        kind: StatKind::from_flags(flags),
        unit: StatUnit::from_flags(flags),
        base: StatBase::from_flags(flags),
        exponent,
        offset: u32_at(raw, 8).unwrap_or(0),
        size,
        bucket_size: u32_at(raw, 12).unwrap_or(0),
        flags,
    };
    if desc.size == 0 {
        return Err(bad_desc(index, &desc, "size is zero"));
    }
    if u64::from(desc.offset) % WORD != 0 {
        return Err(bad_desc(index, &desc, "offset is not 8-byte aligned"));
    }
    if u64::from(desc.offset) + u64::from(desc.size) * WORD > MAX_DATA_BYTES {
        return Err(bad_desc(index, &desc, "extends past MAX_DATA_BYTES"));
    }
    Ok(desc)
}

fn bad_desc(index: usize, d: &StatDesc, reason: &'static str) -> Error {
    Error::BadDescriptor {
        index,
        name: d.name.clone(),
        offset: d.offset,
        size: d.size,
        reason,
    }
}

fn out_of_range(field: &'static str, value: u32, limit: u32) -> Error {
    Error::HeaderOutOfRange {
        field,
        value: value.into(),
        limit: limit.into(),
    }
}

fn u32_at(raw: &[u8], at: usize) -> Option<u32> {
    let b = raw.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The bytes up to the first NUL (or all of them), decoded lossily.
fn c_string(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the bytes read.
fn read_at_most(
    file: &File,
    offset: u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<usize, Error> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(what, e)),
        }
    }
    Ok(done)
}

fn read_exact(file: &File, offset: u64, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
    if read_at_most(file, offset, buf, what)? < buf.len() {
        return Err(Error::Truncated {
            what,
            offset,
            len: buf.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
