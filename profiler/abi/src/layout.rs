//! Region layouts: computing them and formatting a region with one (writers), and validating
//! them from a header (readers and writers attaching to a formatted region).
//!
//! The two region kinds share the common header, the ring and the checks on both; [`RegionKind`]
//! names what differs, so formatting ([`format`]), attaching ([`attach`]) and revalidating
//! ([`revalidate`]) are written once for both.

use core::mem::size_of;
use core::sync::atomic::{fence, Ordering};

use crate::abi::*;
use crate::desc::{Shared, Zero};
use crate::error::{AbiError, Part};
use crate::region::{Region, RegionMut};

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

/// Checks magic, version and sizes of the common header of an `H` region; returns its values and
/// the header.
fn validate_common<'a, H: RegionHeader>(
    region: &Region<'a>,
) -> Result<(CommonValues, &'a H), AbiError> {
    let known_header = size_of::<H>();
    let magic = H::MAGIC;
    let mapping = region.len() as u64;
    let too_small = AbiError::TooSmall {
        needed: known_header as u64,
        available: mapping,
    };
    if region.len() < known_header {
        return Err(too_small);
    }
    let header: &H = region.get(0).ok_or(too_small)?;
    let h = header.common();
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
    let common = CommonValues {
        info: RegionInfo {
            version_major: major,
            version_minor: minor,
            generation: h.generation.load(Ordering::Relaxed),
            clock_id: h.clock_id.load(Ordering::Relaxed),
        },
        header_size,
        region_size,
        vcpu_count,
    };
    Ok((common, header))
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
        #[allow(clippy::cast_possible_truncation)]
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
    // `RingCtl` is a few cache lines long.
    #[allow(clippy::cast_possible_truncation)]
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
        let (common, h) = validate_common::<GuestHeader>(region)?;
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
            // Checked against the mapping's length, a `usize`.
            #[allow(clippy::cast_possible_truncation)]
            size: common.region_size as usize,
        };
        Ok((layout, common.info))
    }
}

impl HostRegionLayout {
    /// Validates the header of a host region, returning its layout (same checks as
    /// [`GuestRegionLayout::from_region`]).
    pub fn from_region(region: &Region<'_>) -> Result<(Self, RegionInfo), AbiError> {
        let (common, h) = validate_common::<HostHeader>(region)?;
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
            // Checked against the mapping's length, a `usize`.
            #[allow(clippy::cast_possible_truncation)]
            size: common.region_size as usize,
        };
        Ok((layout, common.info))
    }
}

/// The header of a region kind: what its magic is and where its common prefix and ring
/// descriptor are.
pub(crate) trait RegionHeader: Shared {
    /// The magic of this kind.
    const MAGIC: u32;
    /// The common prefix.
    fn common(&self) -> &CommonHeader;
    /// The ring descriptor.
    fn ring(&self) -> &RingDesc;
}

impl RegionHeader for GuestHeader {
    const MAGIC: u32 = GUEST_MAGIC;
    fn common(&self) -> &CommonHeader {
        &self.common
    }
    fn ring(&self) -> &RingDesc {
        &self.ring
    }
}

impl RegionHeader for HostHeader {
    const MAGIC: u32 = HOST_MAGIC;
    fn common(&self) -> &CommonHeader {
        &self.common
    }
    fn ring(&self) -> &RingDesc {
        &self.ring
    }
}

/// A region kind, by its layout: what [`format`], [`attach`] and [`revalidate`] need to know.
pub(crate) trait RegionKind: Sized + Copy + PartialEq {
    /// The header.
    type Header: RegionHeader;
    /// A record of the ring.
    type Slot: Shared;
    /// The layout `new` computes for this layout's capacities (the only one formatting accepts).
    fn canonical(&self) -> Result<Self, AbiError>;
    /// Bytes of the header.
    fn header_size(&self) -> usize;
    /// Bytes of the region.
    fn size(&self) -> usize;
    /// vCPUs of the VM.
    fn vcpus(&self) -> u32;
    /// The ring.
    fn ring(&self) -> &RingLayout;
    /// Validates the header of a region of this kind.
    fn from_region(region: &Region<'_>) -> Result<(Self, RegionInfo), AbiError>;
}

impl RegionKind for GuestRegionLayout {
    type Header = GuestHeader;
    type Slot = GuestSampleSlot;
    fn canonical(&self) -> Result<Self, AbiError> {
        Self::new(
            self.vcpus.capacity,
            self.tasks.capacity,
            self.ring.slots.capacity,
        )
    }
    fn header_size(&self) -> usize {
        self.header_size
    }
    fn size(&self) -> usize {
        self.size
    }
    fn vcpus(&self) -> u32 {
        self.vcpus.capacity
    }
    fn ring(&self) -> &RingLayout {
        &self.ring
    }
    fn from_region(region: &Region<'_>) -> Result<(Self, RegionInfo), AbiError> {
        Self::from_region(region)
    }
}

impl RegionKind for HostRegionLayout {
    type Header = HostHeader;
    type Slot = HostSampleSlot;
    fn canonical(&self) -> Result<Self, AbiError> {
        Self::new(self.vcpu_count, self.ring.slots.capacity)
    }
    fn header_size(&self) -> usize {
        self.header_size
    }
    fn size(&self) -> usize {
        self.size
    }
    fn vcpus(&self) -> u32 {
        self.vcpu_count
    }
    fn ring(&self) -> &RingLayout {
        &self.ring
    }
    fn from_region(region: &Region<'_>) -> Result<(Self, RegionInfo), AbiError> {
        Self::from_region(region)
    }
}

/// What the formatter of a region chooses besides the layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionInit {
    /// Generation (e.g. random per VMM start); readers start over when it changes.
    pub generation: u64,
    /// Initial sample period, ns (0 = unknown).
    pub sample_period_ns: u64,
    /// [`CLOCK_NONE`] or [`CLOCK_MONOTONIC`].
    pub clock_id: u32,
}

/// Stores zero into every entry of `table`.
pub(crate) fn zero_table<T: Shared>(region: &Region<'_>, table: &TableLayout) {
    for i in 0..table.capacity as usize {
        if let Some(entry) = region.entry::<T>(table.offset, table.stride, i) {
            entry.zero();
        }
    }
}

/// What a formatter may assume about the bytes of the region it formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Contents {
    /// Anything: every part is zeroed.
    Unknown,
    /// All zero already (a freshly sized file): only the non-zero fields are written, so the
    /// pages of the ring and tables are not touched (each first touch is a page fault).
    Zeroed,
}

/// Formats `region` as an empty region of `layout`'s kind (`layout` must be one its `new`
/// computes): zeroes the header and (unless `contents` says it is zero already) the ring, lets
/// `fill` zero and describe the kind's own tables, writes the common header and the ring
/// descriptor, and stores the magic last (release), so a reader that sees the magic sees a
/// complete header. Then attaches to it.
///
/// Must not race with other writers of the region.
pub(crate) fn format<'a, K: RegionKind>(
    region: RegionMut<'a>,
    layout: &K,
    init: &RegionInit,
    contents: Contents,
    fill: impl FnOnce(&Region<'a>, &K::Header),
) -> Result<Attached<'a, K>, AbiError> {
    if layout.canonical()? != *layout {
        return Err(AbiError::LayoutChanged);
    }
    let region = region.as_region();
    if region.len() < layout.size() {
        return Err(AbiError::TooSmall {
            needed: layout.size() as u64,
            available: region.len() as u64,
        });
    }
    let h: &K::Header = region.get(0).ok_or(AbiError::OutOfBounds(Part::Header))?;
    let r = Ordering::Relaxed;
    h.common().magic.store(0, r);
    fence(Ordering::Release);
    h.zero();
    let ring = layout.ring();
    if contents == Contents::Unknown {
        zero_table::<K::Slot>(&region, &ring.slots);
    }
    let ctl: &RingCtl = region
        .get(ring.ctl_offset)
        .ok_or(AbiError::OutOfBounds(Part::RingCtl))?;
    ctl.zero();
    ctl.head.store(SEQ_FIRST, r);
    fill(&region, h);

    let c = h.common();
    c.version_major.store(ABI_VERSION_MAJOR, r);
    c.version_minor.store(ABI_VERSION_MINOR, r);
    // The header is a fixed struct of a few hundred bytes.
    #[allow(clippy::cast_possible_truncation)]
    c.header_size.store(layout.header_size() as u32, r);
    c.region_size.store(layout.size() as u64, r);
    c.generation.store(init.generation, r);
    c.sample_period_ns.store(init.sample_period_ns, r);
    c.vcpu_count.store(layout.vcpus(), r);
    c.clock_id.store(init.clock_id, r);
    let desc = h.ring();
    desc.ctl_offset.store(ring.ctl_offset as u64, r);
    desc.slots_offset.store(ring.slots.offset as u64, r);
    desc.capacity.store(ring.slots.capacity, r);
    // Strides are slot sizes checked by the layout (far below 4 GiB).
    #[allow(clippy::cast_possible_truncation)]
    desc.stride.store(ring.slots.stride as u32, r);
    c.magic.store(K::Header::MAGIC, Ordering::Release);
    attach(RegionMut::from_region(region))
}

/// A formatted region opened for writing, with the layout and header values it was validated
/// with.
#[derive(Debug)]
pub(crate) struct Attached<'a, K> {
    pub region: Region<'a>,
    pub layout: K,
    pub info: RegionInfo,
}

/// Opens a formatted region of kind `K` for writing, validating it like a reader would.
pub(crate) fn attach<K: RegionKind>(region: RegionMut<'_>) -> Result<Attached<'_, K>, AbiError> {
    let region = region.as_region();
    let (layout, info) = K::from_region(&region)?;
    Ok(Attached {
        region,
        layout,
        info,
    })
}

/// Validates `region`'s header again; fails with [`AbiError::LayoutChanged`] if the layout or the
/// generation differ from what was validated before (or with the validation error).
pub(crate) fn revalidate<K: RegionKind>(
    region: &Region<'_>,
    layout: &K,
    info: &RegionInfo,
) -> Result<(), AbiError> {
    let (now, now_info) = K::from_region(region)?;
    if now != *layout || now_info.generation != info.generation {
        return Err(AbiError::LayoutChanged);
    }
    Ok(())
}
