//! Errors.

use core::fmt;

/// A part of a region, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The header.
    Header,
    /// The per-vCPU slots.
    Vcpus,
    /// The task table.
    Tasks,
    /// The ring's control block.
    RingCtl,
    /// The ring's records.
    RingSlots,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Header => "header",
            Part::Vcpus => "vCPU slots",
            Part::Tasks => "task table",
            Part::RingCtl => "ring control block",
            Part::RingSlots => "ring records",
        })
    }
}

/// Why a region (or a layout, or a request) was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiError {
    /// The mapping's base address is null or not 8-byte aligned.
    Misaligned,
    /// The mapping (or a region) is smaller than needed.
    TooSmall {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Wrong magic number (the other region kind's magic included).
    BadMagic {
        /// Found.
        found: u32,
        /// Expected.
        expected: u32,
    },
    /// A major version this reader does not understand.
    UnsupportedVersion {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },
    /// `header_size` below the known header, not a multiple of 8, or beyond the region.
    BadHeaderSize(u32),
    /// `region_size` not a multiple of the page size, below the header, or larger than the
    /// mapping.
    BadRegionSize {
        /// `region_size` from the header.
        header: u64,
        /// Bytes mapped.
        mapping: u64,
    },
    /// `vcpu_count` outside `1..=MAX_VCPUS`, or different from the vCPU table's capacity.
    BadVcpuCount(u32),
    /// A capacity of zero.
    ZeroCapacity(Part),
    /// A capacity above the ABI's limit.
    CapacityTooLarge {
        /// Which part.
        part: Part,
        /// Requested or found.
        capacity: u64,
        /// Limit.
        max: u64,
    },
    /// A stride smaller than the entry, not a multiple of 8, or above `MAX_STRIDE`.
    BadStride {
        /// Which part.
        part: Part,
        /// Stride found.
        stride: u32,
    },
    /// An offset not 8-byte aligned, or inside the header.
    BadOffset {
        /// Which part.
        part: Part,
        /// Offset found.
        offset: u64,
    },
    /// A part extends past `region_size`.
    OutOfBounds(Part),
    /// Two parts overlap.
    Overlap(Part, Part),
    /// Arithmetic on sizes overflowed.
    Overflow(Part),
    /// The ring's head is 0 or has [`SEQ_WRITING`](crate::SEQ_WRITING) set (writer attach).
    BadHead(u64),
    /// An index beyond a table's capacity.
    IndexOutOfRange {
        /// Index asked for.
        index: u32,
        /// Capacity.
        capacity: u32,
    },
    /// No free or reusable task-table entry.
    TableFull,
    /// The pid is already registered, under this task id.
    AlreadyRegistered(u32),
    /// The task id does not name a registered task.
    NotRegistered(u32),
    /// The region's header no longer matches the layout validated earlier.
    LayoutChanged,
}

impl fmt::Display for AbiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AbiError::Misaligned => f.write_str("region base is null or not 8-byte aligned"),
            AbiError::TooSmall { needed, available } => {
                write!(
                    f,
                    "region too small: {needed} bytes needed, {available} available"
                )
            }
            AbiError::BadMagic { found, expected } => {
                write!(f, "bad magic {found:#010x} (expected {expected:#010x})")
            }
            AbiError::UnsupportedVersion { major, minor } => {
                write!(f, "unsupported ABI version {major}.{minor}")
            }
            AbiError::BadHeaderSize(size) => write!(f, "bad header size {size}"),
            AbiError::BadRegionSize { header, mapping } => {
                write!(f, "bad region size {header} (mapping has {mapping} bytes)")
            }
            AbiError::BadVcpuCount(n) => write!(f, "bad vCPU count {n}"),
            AbiError::ZeroCapacity(part) => write!(f, "{part}: zero capacity"),
            AbiError::CapacityTooLarge {
                part,
                capacity,
                max,
            } => {
                write!(f, "{part}: capacity {capacity} above the limit {max}")
            }
            AbiError::BadStride { part, stride } => write!(f, "{part}: bad stride {stride}"),
            AbiError::BadOffset { part, offset } => write!(f, "{part}: bad offset {offset}"),
            AbiError::OutOfBounds(part) => write!(f, "{part}: extends past the region"),
            AbiError::Overlap(a, b) => write!(f, "{a} overlaps {b}"),
            AbiError::Overflow(part) => write!(f, "{part}: size arithmetic overflows"),
            AbiError::BadHead(head) => write!(f, "bad ring head {head:#x}"),
            AbiError::IndexOutOfRange { index, capacity } => {
                write!(f, "index {index} out of range (capacity {capacity})")
            }
            AbiError::TableFull => f.write_str("task table full"),
            AbiError::AlreadyRegistered(id) => write!(f, "already registered as task {id}"),
            AbiError::NotRegistered(id) => write!(f, "task {id} is not registered"),
            AbiError::LayoutChanged => f.write_str("region layout changed since validation"),
        }
    }
}

impl core::error::Error for AbiError {}

/// Why one read of shared data produced no value. These are expected outcomes of lock-free
/// reading, not corruption of the reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Index or sequence outside what the region holds (e.g. a vCPU index ≥ `vcpu_count`).
    OutOfRange,
    /// The record with this sequence has not been written yet (or is being written right now).
    NotYetWritten,
    /// The writer has lapped the reader: the slot already holds a newer record.
    Overwritten,
    /// The record was overwritten while it was being copied.
    Torn,
    /// A seqlocked entry stayed mid-update for every bounded retry (a writer that is slow — or
    /// a hostile guest that keeps it odd).
    Busy,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReadError::OutOfRange => "out of range",
            ReadError::NotYetWritten => "not yet written",
            ReadError::Overwritten => "overwritten",
            ReadError::Torn => "torn (overwritten during the read)",
            ReadError::Busy => "entry stayed mid-update",
        })
    }
}

impl core::error::Error for ReadError {}
