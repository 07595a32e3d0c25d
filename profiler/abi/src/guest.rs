//! The guest region: formatting and writing it (guest driver, VMM) and reading it (host).

use core::sync::atomic::Ordering;

use crate::abi::*;
use crate::error::{AbiError, ReadError};
use crate::layout::{self, zero_table, Attached, GuestRegionLayout, RegionInfo, RegionInit};
use crate::region::{Region, RegionMut};
use crate::ring::{GuestSample, RingView, RingWriter};
use crate::tables::{read_task, read_vcpu, TaskInfo, TaskTableWriter, VcpuSlotWriter, VcpuState};

/// A guest region opened for writing: by the guest driver (vCPU slots, task table, samples) or by
/// the VMM that formats it.
#[derive(Debug)]
pub struct GuestRegion<'a>(Attached<'a, GuestRegionLayout>);

impl<'a> GuestRegion<'a> {
    /// Formats `region` as an empty guest region with `layout` (which must be one
    /// [`GuestRegionLayout::new`] computes): zeroes every part, writes the header, and stores the
    /// magic last (release), so a reader that sees the magic sees a complete header.
    ///
    /// Must not race with other writers of the region.
    pub fn format(
        region: RegionMut<'a>,
        layout: &GuestRegionLayout,
        init: &RegionInit,
    ) -> Result<Self, AbiError> {
        Self::format_as(region, layout, init, layout::Contents::Unknown)
    }

    /// As [`GuestRegion::format`], for a region whose bytes are all zero (a freshly sized
    /// file): only the header and the vCPU slots' non-zero fields are written, so the pages of
    /// the ring and the task table are left untouched.
    pub fn format_zeroed(
        region: RegionMut<'a>,
        layout: &GuestRegionLayout,
        init: &RegionInit,
    ) -> Result<Self, AbiError> {
        Self::format_as(region, layout, init, layout::Contents::Zeroed)
    }

    fn format_as(
        region: RegionMut<'a>,
        layout: &GuestRegionLayout,
        init: &RegionInit,
        contents: layout::Contents,
    ) -> Result<Self, AbiError> {
        let attached =
            layout::format(region, layout, init, contents, |region, h: &GuestHeader| {
                if contents == layout::Contents::Unknown {
                    zero_table::<VcpuSlot>(region, &layout.vcpus);
                    zero_table::<TaskEntry>(region, &layout.tasks);
                }
                let r = Ordering::Relaxed;
                for i in 0..layout.vcpus.capacity as usize {
                    if let Some(slot) =
                        region.entry::<VcpuSlot>(layout.vcpus.offset, layout.vcpus.stride, i)
                    {
                        slot.task_id.store(TASK_NONE, r);
                    }
                }
                for (desc, table) in [(&h.vcpus, &layout.vcpus), (&h.tasks, &layout.tasks)] {
                    desc.offset.store(table.offset as u64, r);
                    desc.capacity.store(table.capacity, r);
                    // Strides are slot sizes checked by `Layout` (far below 4 GiB).
                    #[allow(clippy::cast_possible_truncation)]
                    desc.stride.store(table.stride as u32, r);
                }
            })?;
        Ok(Self(attached))
    }

    /// Opens a formatted guest region for writing (validating it like a reader would).
    pub fn attach(region: RegionMut<'a>) -> Result<Self, AbiError> {
        layout::attach(region).map(Self)
    }

    /// The layout.
    pub fn layout(&self) -> &GuestRegionLayout {
        &self.0.layout
    }

    /// Version and generation the region was validated with.
    pub fn info(&self) -> RegionInfo {
        self.0.info
    }

    fn header(&self) -> Option<&'a GuestHeader> {
        self.0.region.get(0)
    }

    /// Publishes the guest sampler's period, ns.
    pub fn set_sample_period_ns(&self, period_ns: u64) {
        if let Some(h) = self.header() {
            h.common
                .sample_period_ns
                .store(period_ns, Ordering::Release);
        }
    }

    /// Publishes the guest's boot id (the driver, when it attaches).
    pub fn set_guest_boot_id(&self, boot_id: u64) {
        if let Some(h) = self.header() {
            h.guest_boot_id.store(boot_id, Ordering::Release);
        }
    }

    /// The writer of vCPU `index`'s slot.
    pub fn vcpu_writer(&self, index: u32) -> Result<VcpuSlotWriter<'a>, AbiError> {
        let out_of_range = AbiError::IndexOutOfRange {
            index,
            capacity: self.0.layout.vcpus.capacity,
        };
        if index >= self.0.layout.vcpus.capacity {
            return Err(out_of_range);
        }
        let v = &self.0.layout.vcpus;
        let slot = self
            .0
            .region
            .entry(v.offset, v.stride, index as usize)
            .ok_or(out_of_range)?;
        Ok(VcpuSlotWriter::new(slot))
    }

    /// The writer of the task table.
    pub fn task_table(&self) -> TaskTableWriter<'a> {
        TaskTableWriter::new(self.0.region, self.0.layout.tasks)
    }

    /// The writer of the guest sample ring, continuing at its head.
    pub fn ring_writer(&self) -> Result<RingWriter<'a, GuestSample>, AbiError> {
        RingWriter::attach(RingView::new(self.0.region, self.0.layout.ring)?)
    }

    /// Clears every vCPU slot and the task table, keeping the ring (whose sequence numbers stay
    /// monotonic): what a driver does when it attaches to a region a previous boot used.
    pub fn clear_tables(&self) -> Result<(), AbiError> {
        for i in 0..self.0.layout.vcpus.capacity {
            self.vcpu_writer(i)?.clear();
        }
        self.task_table().clear();
        Ok(())
    }

    /// The region for reading.
    pub fn view(&self) -> Result<GuestRegionView<'a>, AbiError> {
        validate_guest_region(self.0.region)
    }
}

/// Validates a guest region (e.g. the host's read-only mapping of guest-writable memory) and
/// returns a view of it. See [`GuestRegionLayout::from_region`] for the checks.
///
/// The view keeps the layout it validated: if the guest rewrites the header later, the view
/// keeps using the validated offsets (it never follows the new ones); use
/// [`GuestRegionView::revalidate`] to notice.
pub fn validate_guest_region(region: Region<'_>) -> Result<GuestRegionView<'_>, AbiError> {
    let (layout, info) = GuestRegionLayout::from_region(&region)?;
    let ring = RingView::new(region, layout.ring)?;
    Ok(GuestRegionView {
        region,
        layout,
        info,
        ring,
    })
}

/// A validated guest region, for reading. Every value it returns came from guest-writable
/// memory: consistent (seqlock / sequence checked) but not trustworthy.
#[derive(Clone, Copy, Debug)]
pub struct GuestRegionView<'a> {
    region: Region<'a>,
    layout: GuestRegionLayout,
    info: RegionInfo,
    ring: RingView<'a, GuestSample>,
}

impl<'a> GuestRegionView<'a> {
    /// The validated layout.
    pub fn layout(&self) -> &GuestRegionLayout {
        &self.layout
    }

    /// Version, generation and clock at validation time.
    pub fn info(&self) -> RegionInfo {
        self.info
    }

    fn header(&self) -> Option<&'a GuestHeader> {
        self.region.get(0)
    }

    /// The guest sampler's period as published now, ns.
    pub fn sample_period_ns(&self) -> u64 {
        self.header()
            .map_or(0, |h| h.common.sample_period_ns.load(Ordering::Relaxed))
    }

    /// The guest's boot id as published now.
    pub fn guest_boot_id(&self) -> u64 {
        self.header()
            .map_or(0, |h| h.guest_boot_id.load(Ordering::Relaxed))
    }

    /// vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.layout.vcpus.capacity
    }

    /// Entries in the task table.
    pub fn task_capacity(&self) -> u32 {
        self.layout.tasks.capacity
    }

    /// A consistent snapshot of vCPU `index`'s slot.
    pub fn vcpu(&self, index: u32) -> Result<VcpuState, ReadError> {
        if index >= self.layout.vcpus.capacity {
            return Err(ReadError::OutOfRange);
        }
        let v = &self.layout.vcpus;
        read_vcpu(
            self.region
                .entry(v.offset, v.stride, index as usize)
                .ok_or(ReadError::OutOfRange)?,
        )
    }

    /// A consistent snapshot of task-table entry `task_id`.
    pub fn task(&self, task_id: u32) -> Result<TaskInfo, ReadError> {
        if task_id >= self.layout.tasks.capacity {
            return Err(ReadError::OutOfRange);
        }
        let t = &self.layout.tasks;
        read_task(
            self.region
                .entry(t.offset, t.stride, task_id as usize)
                .ok_or(ReadError::OutOfRange)?,
        )
    }

    /// Every task-table entry, in task-id order (`capacity` items).
    pub fn tasks(&self) -> impl Iterator<Item = (u32, Result<TaskInfo, ReadError>)> + 'a {
        let view = *self;
        (0..self.layout.tasks.capacity).map(move |id| (id, view.task(id)))
    }

    /// The guest sample ring.
    pub fn ring(&self) -> RingView<'a, GuestSample> {
        self.ring
    }

    /// Validates the header again; fails with [`AbiError::LayoutChanged`] if the layout or the
    /// generation differ from what this view validated (or with the validation error).
    pub fn revalidate(&self) -> Result<(), AbiError> {
        layout::revalidate(&self.region, &self.layout, &self.info)
    }
}
