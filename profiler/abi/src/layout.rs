//! Region layouts: computing them (writers) and validating them from a header (readers).

use core::mem::size_of;
use core::sync::atomic::{fence, Ordering};

use crate::abi::*;
use crate::error::{AbiError, Part};
use crate::region::Region;

/// Where an array of fixed-size entries lies in a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableLayout {
    /// Byte offset of entry 0.
    pub offset: usize,
    /// Entries.
    pub capacity: u32,
    /// Bytes from one entry to the next.
    pub stride: usize,
}

impl TableLayout {
    /// First byte after the last entry (saturating; exact for validated layouts).
    pub fn end(&self) -> usize {
        (self.capacity as usize)
            .saturating_mul(self.stride)
            .saturating_add(self.offset)
    }
}

/// Where a sample ring lies in a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingLayout {
    /// Byte offset of the [`RingCtl`].
    pub ctl_offset: usize,
    /// The records.
    pub slots: TableLayout,
}

/// Layout of a guest region: header, vCPU slots, task table, guest sample ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestRegionLayout {
    /// Bytes of the header.
    pub header_size: usize,
    /// The per-vCPU slots ([`VcpuSlot`]); `capacity` is the vCPU count.
    pub vcpus: TableLayout,
    /// The task table ([`TaskEntry`]).
    pub tasks: TableLayout,
    /// The guest sample ring ([`GuestSampleSlot`]).
    pub ring: RingLayout,
    /// Bytes of the region (a multiple of [`PAGE_SIZE`]).
    pub size: usize,
}

/// Layout of a host region: header and host sample ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostRegionLayout {
    /// Bytes of the header.
    pub header_size: usize,
    /// vCPUs of the VM (host records carry a vCPU index below this).
    pub vcpu_count: u32,
    /// The host sample ring ([`HostSampleSlot`]).
    pub ring: RingLayout,
    /// Bytes of the region (a multiple of [`PAGE_SIZE`]).
    pub size: usize,
}

/// Appends parts to a layout under construction, cache-line aligned, with checked arithmetic.
struct Builder {
    next: u64,
}

impl Builder {
    fn new() -> Self {
        Self {
            next: HEADER_SIZE as u64,
        }
    }

    fn check_capacity(part: Part, capacity: u32, max: u32) -> Result<(), AbiError> {
        if capacity == 0 {
            return Err(AbiError::ZeroCapacity(part));
        }
        if capacity > max {
            return Err(AbiError::CapacityTooLarge {
                part,
                capacity: capacity.into(),
                max: max.into(),
            });
        }
        Ok(())
    }

    fn table(&mut self, part: Part, capacity: u32, stride: usize) -> Result<TableLayout, AbiError> {
        let offset = align_up(self.next, CACHE_LINE.into()).ok_or(AbiError::Overflow(part))?;
        let bytes = u64::from(capacity)
            .checked_mul(stride as u64)
            .ok_or(AbiError::Overflow(part))?;
        self.next = offset.checked_add(bytes).ok_or(AbiError::Overflow(part))?;
        Ok(TableLayout {
            offset: to_usize(offset, part)?,
            capacity,
            stride,
        })
    }

    fn ring(&mut self, capacity: u32, stride: usize) -> Result<RingLayout, AbiError> {
        Self::check_capacity(Part::RingSlots, capacity, MAX_RING_RECORDS)?;
        let ctl = self.table(Part::RingCtl, 1, size_of::<RingCtl>())?;
        let slots = self.table(Part::RingSlots, capacity, stride)?;
        Ok(RingLayout {
            ctl_offset: ctl.offset,
            slots,
        })
    }

    fn finish(self) -> Result<usize, AbiError> {
        let size =
            align_up(self.next, PAGE_SIZE.into()).ok_or(AbiError::Overflow(Part::RingSlots))?;
        to_usize(size, Part::RingSlots)
    }
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? / align * align)
}

fn to_usize(value: u64, part: Part) -> Result<usize, AbiError> {
    usize::try_from(value).map_err(|_| AbiError::Overflow(part))
}

impl GuestRegionLayout {
    /// The layout this crate writes for `vcpus` vCPU slots, `tasks` task-table entries and
    /// `ring_records` guest samples. Rejects zero and over-limit capacities and overflow.
    pub fn new(vcpus: u32, tasks: u32, ring_records: u32) -> Result<Self, AbiError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(AbiError::BadVcpuCount(vcpus));
        }
        Builder::check_capacity(Part::Tasks, tasks, MAX_TASKS)?;
        let mut b = Builder::new();
        let vcpus = b.table(Part::Vcpus, vcpus, size_of::<VcpuSlot>())?;
        let tasks = b.table(Part::Tasks, tasks, size_of::<TaskEntry>())?;
        let ring = b.ring(ring_records, size_of::<GuestSampleSlot>())?;
        Ok(Self {
            header_size: HEADER_SIZE as usize,
            vcpus,
            tasks,
            ring,
            size: b.finish()?,
        })
    }

    /// vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.capacity
    }
}

impl HostRegionLayout {
    /// The layout this crate writes for a VM of `vcpus` vCPUs and `ring_records` host samples.
    pub fn new(vcpus: u32, ring_records: u32) -> Result<Self, AbiError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(AbiError::BadVcpuCount(vcpus));
        }
        let mut b = Builder::new();
        let ring = b.ring(ring_records, size_of::<HostSampleSlot>())?;
        Ok(Self {
            header_size: HEADER_SIZE as usize,
            vcpu_count: vcpus,
            ring,
            size: b.finish()?,
        })
    }
}

/// Fields of the common header a validated region was formatted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionInfo {
    /// ABI major version of the writer.
    pub version_major: u16,
    /// ABI minor version of the writer.
    pub version_minor: u16,
    /// Generation at validation time.
    pub generation: u64,
    /// Clock of the ring's timestamps.
    pub clock_id: u32,
}

/// Header fields of a region, loaded once (relaxed) and then checked as plain integers.
struct CommonValues {
    info: RegionInfo,
    header_size: u32,
    region_size: u64,
    vcpu_count: u32,
}

/// Checks magic, version and sizes of the common header; returns its values.
fn validate_common(
    region: &Region<'_>,
    magic: u32,
    known_header: usize,
) -> Result<CommonValues, AbiError> {
    let mapping = region.len() as u64;
    let too_small = AbiError::TooSmall {
        needed: known_header as u64,
        available: mapping,
    };
    if region.len() < known_header {
        return Err(too_small);
    }
    let h: &CommonHeader = region.get(0).ok_or(too_small)?;
    let found = h.magic.load(Ordering::Relaxed);
    // Pairs with the formatter's release store of the magic: everything it wrote before is
    // visible to the loads below.
    fence(Ordering::Acquire);
    if found != magic {
        return Err(AbiError::BadMagic {
            found,
            expected: magic,
        });
    }
    let major = h.version_major.load(Ordering::Relaxed);
    let minor = h.version_minor.load(Ordering::Relaxed);
    if major != ABI_VERSION_MAJOR {
        return Err(AbiError::UnsupportedVersion { major, minor });
    }
    let header_size = h.header_size.load(Ordering::Relaxed);
    let region_size = h.region_size.load(Ordering::Relaxed);
    if region_size > mapping
        || region_size % u64::from(PAGE_SIZE) != 0
        || region_size < known_header as u64
    {
        return Err(AbiError::BadRegionSize {
            header: region_size,
            mapping,
        });
    }
    if (header_size as usize) < known_header
        || header_size % 8 != 0
        || u64::from(header_size) > region_size
    {
        return Err(AbiError::BadHeaderSize(header_size));
    }
    let vcpu_count = h.vcpu_count.load(Ordering::Relaxed);
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(AbiError::BadVcpuCount(vcpu_count));
    }
    Ok(CommonValues {
        info: RegionInfo {
            version_major: major,
            version_minor: minor,
            generation: h.generation.load(Ordering::Relaxed),
            clock_id: h.clock_id.load(Ordering::Relaxed),
        },
        header_size,
        region_size,
        vcpu_count,
    })
}

/// Checks one array described by a header against the region.
fn validate_table(
    part: Part,
    offset: u64,
    capacity: u32,
    stride: u32,
    min_stride: usize,
    max_capacity: u32,
    common: &CommonValues,
) -> Result<TableLayout, AbiError> {
    Builder::check_capacity(part, capacity, max_capacity)?;
    if (stride as usize) < min_stride || stride % 8 != 0 || stride > MAX_STRIDE {
        return Err(AbiError::BadStride { part, stride });
    }
    if offset % 8 != 0 || offset < u64::from(common.header_size) {
        return Err(AbiError::BadOffset { part, offset });
    }
    let end = u64::from(capacity)
        .checked_mul(u64::from(stride))
        .and_then(|bytes| bytes.checked_add(offset))
        .ok_or(AbiError::Overflow(part))?;
    if end > common.region_size {
        return Err(AbiError::OutOfBounds(part));
    }
    // `end <= region_size <= mapping length`, which is a `usize`: these cannot truncate.
    Ok(TableLayout {
        offset: offset as usize,
        capacity,
        stride: stride as usize,
    })
}

fn validate_ring(
    desc: &RingDesc,
    min_stride: usize,
    common: &CommonValues,
) -> Result<RingLayout, AbiError> {
    let ctl = validate_table(
        Part::RingCtl,
        desc.ctl_offset.load(Ordering::Relaxed),
        1,
        size_of::<RingCtl>() as u32,
        size_of::<RingCtl>(),
        1,
        common,
    )?;
    let slots = validate_table(
        Part::RingSlots,
        desc.slots_offset.load(Ordering::Relaxed),
        desc.capacity.load(Ordering::Relaxed),
        desc.stride.load(Ordering::Relaxed),
        min_stride,
        MAX_RING_RECORDS,
        common,
    )?;
    Ok(RingLayout {
        ctl_offset: ctl.offset,
        slots,
    })
}

/// Fails if any two of the byte ranges overlap (at most five parts: quadratic is fine).
fn check_disjoint(parts: &[(Part, usize, usize)]) -> Result<(), AbiError> {
    for (i, &(a, a_start, a_end)) in parts.iter().enumerate() {
        for &(b, b_start, b_end) in &parts[i + 1..] {
            if a_start < b_end && b_start < a_end {
                return Err(AbiError::Overlap(a, b));
            }
        }
    }
    Ok(())
}

impl GuestRegionLayout {
    /// Validates the header of a guest region someone else wrote, returning its layout.
    ///
    /// Every field is checked as an untrusted integer: magic, major version, sizes (against the
    /// mapping), capacities (against the ABI limits), strides, offsets (alignment, inside the
    /// region, after the header, no overlap), with checked arithmetic throughout.
    pub fn from_region(region: &Region<'_>) -> Result<(Self, RegionInfo), AbiError> {
        let common = validate_common(region, GUEST_MAGIC, size_of::<GuestHeader>())?;
        let h: &GuestHeader = region.get(0).ok_or(AbiError::TooSmall {
            needed: size_of::<GuestHeader>() as u64,
            available: region.len() as u64,
        })?;
        let vcpus = validate_table(
            Part::Vcpus,
            h.vcpus.offset.load(Ordering::Relaxed),
            h.vcpus.capacity.load(Ordering::Relaxed),
            h.vcpus.stride.load(Ordering::Relaxed),
            size_of::<VcpuSlot>(),
            MAX_VCPUS,
            &common,
        )?;
        if vcpus.capacity != common.vcpu_count {
            return Err(AbiError::BadVcpuCount(vcpus.capacity));
        }
        let tasks = validate_table(
            Part::Tasks,
            h.tasks.offset.load(Ordering::Relaxed),
            h.tasks.capacity.load(Ordering::Relaxed),
            h.tasks.stride.load(Ordering::Relaxed),
            size_of::<TaskEntry>(),
            MAX_TASKS,
            &common,
        )?;
        let ring = validate_ring(&h.ring, size_of::<GuestSampleSlot>(), &common)?;
        check_disjoint(&[
            (Part::Header, 0, common.header_size as usize),
            (Part::Vcpus, vcpus.offset, vcpus.end()),
            (Part::Tasks, tasks.offset, tasks.end()),
            (
                Part::RingCtl,
                ring.ctl_offset,
                ring.ctl_offset + size_of::<RingCtl>(),
            ),
            (Part::RingSlots, ring.slots.offset, ring.slots.end()),
        ])?;
        let layout = Self {
            header_size: common.header_size as usize,
            vcpus,
            tasks,
            ring,
            size: common.region_size as usize,
        };
        Ok((layout, common.info))
    }
}

impl HostRegionLayout {
    /// Validates the header of a host region, returning its layout (same checks as
    /// [`GuestRegionLayout::from_region`]).
    pub fn from_region(region: &Region<'_>) -> Result<(Self, RegionInfo), AbiError> {
        let common = validate_common(region, HOST_MAGIC, size_of::<HostHeader>())?;
        let h: &HostHeader = region.get(0).ok_or(AbiError::TooSmall {
            needed: size_of::<HostHeader>() as u64,
            available: region.len() as u64,
        })?;
        let ring = validate_ring(&h.ring, size_of::<HostSampleSlot>(), &common)?;
        check_disjoint(&[
            (Part::Header, 0, common.header_size as usize),
            (
                Part::RingCtl,
                ring.ctl_offset,
                ring.ctl_offset + size_of::<RingCtl>(),
            ),
            (Part::RingSlots, ring.slots.offset, ring.slots.end()),
        ])?;
        let layout = Self {
            header_size: common.header_size as usize,
            vcpu_count: common.vcpu_count,
            ring,
            size: common.region_size as usize,
        };
        Ok((layout, common.info))
    }
}
