//! The host region: written by the VMM's sampler only, never mapped into the guest.

use core::sync::atomic::Ordering;

use crate::abi::*;
use crate::error::{AbiError, ReadError};
use crate::layout::{self, Attached, HostRegionLayout, RegionInfo, RegionInit};
use crate::region::{Region, RegionMut};
use crate::ring::{HostSample, RingView, RingWriter};
use crate::tables::VcpuState;

/// A host region opened for writing (the VMM).
#[derive(Debug)]
pub struct HostRegion<'a>(Attached<'a, HostRegionLayout>);

impl<'a> HostRegion<'a> {
    /// Formats `region` as an empty host region with `layout` (one [`HostRegionLayout::new`]
    /// computes); the magic is stored last (release).
    pub fn format(
        region: RegionMut<'a>,
        layout: &HostRegionLayout,
        init: &RegionInit,
    ) -> Result<Self, AbiError> {
        // The host region has no tables besides the ring.
        layout::format(region, layout, init, layout::Contents::Unknown, |_, _| {}).map(Self)
    }

    /// As [`HostRegion::format`], for a region whose bytes are all zero (a freshly sized file):
    /// the ring's pages are left untouched.
    pub fn format_zeroed(
        region: RegionMut<'a>,
        layout: &HostRegionLayout,
        init: &RegionInit,
    ) -> Result<Self, AbiError> {
        layout::format(region, layout, init, layout::Contents::Zeroed, |_, _| {}).map(Self)
    }

    /// Opens a formatted host region for writing.
    pub fn attach(region: RegionMut<'a>) -> Result<Self, AbiError> {
        layout::attach(region).map(Self)
    }

    /// The layout.
    pub fn layout(&self) -> &HostRegionLayout {
        &self.0.layout
    }

    /// Version and generation.
    pub fn info(&self) -> RegionInfo {
        self.0.info
    }

    /// Publishes the host sampler's period, ns.
    pub fn set_sample_period_ns(&self, period_ns: u64) {
        if let Some(h) = self.0.region.get::<HostHeader>(0) {
            h.common
                .sample_period_ns
                .store(period_ns, Ordering::Release);
        }
    }

    /// Publishes the VM's memory sharing (the VMM's sharing scan; one writer).
    pub fn set_mem_sharing(&self, figures: &MemSharingFigures) {
        let Some(h) = self.0.region.get::<HostHeader>(0) else {
            return;
        };
        let m = &h.mem;
        let seq = m.seq.load(Ordering::Relaxed);
        m.seq.store(seq.wrapping_add(1) | 1, Ordering::Relaxed);
        core::sync::atomic::fence(Ordering::Release);
        m.ram_pages.store(figures.ram_pages, Ordering::Relaxed);
        m.shared_pages
            .store(figures.shared_pages, Ordering::Relaxed);
        m.private_pages
            .store(figures.private_pages, Ordering::Relaxed);
        m.merged_pages
            .store(figures.merged_pages, Ordering::Relaxed);
        m.cow_breaks.store(figures.cow_breaks, Ordering::Relaxed);
        m.flags.store(
            if figures.cloned { MEM_CLONED } else { 0 },
            Ordering::Relaxed,
        );
        m.scanned_ns.store(figures.scanned_ns, Ordering::Relaxed);
        m.seq.store((seq | 1).wrapping_add(1), Ordering::Release);
    }

    /// Publishes whether the VM is paused (minor 3, [`VM_PAUSED`]).
    pub fn set_paused(&self, paused: bool) {
        if let Some(h) = self.0.region.get::<HostHeader>(0) {
            if paused {
                h.vm_state.fetch_or(VM_PAUSED, Ordering::Release);
            } else {
                h.vm_state.fetch_and(!VM_PAUSED, Ordering::Release);
            }
        }
    }

    /// The writer of the host sample ring (one per region), continuing at its head.
    pub fn ring_writer(&self) -> Result<RingWriter<'a, HostSample>, AbiError> {
        RingWriter::attach(RingView::new(self.0.region, self.0.layout.ring)?)
    }

    /// The region for reading.
    pub fn view(&self) -> Result<HostRegionView<'a>, AbiError> {
        validate_host_region(self.0.region)
    }
}

/// Validates a host region and returns a view of it (same checks as for a guest region: a host
/// reader should not trust a file or mapping it did not create either).
pub fn validate_host_region(region: Region<'_>) -> Result<HostRegionView<'_>, AbiError> {
    let (layout, info) = HostRegionLayout::from_region(&region)?;
    let ring = RingView::new(region, layout.ring)?;
    Ok(HostRegionView {
        region,
        layout,
        info,
        ring,
    })
}

/// A validated host region, for reading.
#[derive(Clone, Copy, Debug)]
pub struct HostRegionView<'a> {
    region: Region<'a>,
    layout: HostRegionLayout,
    info: RegionInfo,
    ring: RingView<'a, HostSample>,
}

impl<'a> HostRegionView<'a> {
    /// The validated layout.
    pub fn layout(&self) -> &HostRegionLayout {
        &self.layout
    }

    /// Version, generation and clock at validation time.
    pub fn info(&self) -> RegionInfo {
        self.info
    }

    /// vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.layout.vcpu_count
    }

    /// The host sampler's period as published now, ns.
    pub fn sample_period_ns(&self) -> u64 {
        self.region
            .get::<HostHeader>(0)
            .map_or(0, |h| h.common.sample_period_ns.load(Ordering::Relaxed))
    }

    /// The VM's memory sharing as last published: `None` before the first scan (all zero), or
    /// when the block stayed mid-update over a few reads.
    pub fn mem_sharing(&self) -> Option<MemSharingFigures> {
        let m = &self.region.get::<HostHeader>(0)?.mem;
        for _ in 0..8 {
            let before = m.seq.load(Ordering::Acquire);
            if before & 1 == 1 {
                core::hint::spin_loop();
                continue;
            }
            let figures = MemSharingFigures {
                ram_pages: m.ram_pages.load(Ordering::Relaxed),
                shared_pages: m.shared_pages.load(Ordering::Relaxed),
                private_pages: m.private_pages.load(Ordering::Relaxed),
                merged_pages: m.merged_pages.load(Ordering::Relaxed),
                cow_breaks: m.cow_breaks.load(Ordering::Relaxed),
                cloned: m.flags.load(Ordering::Relaxed) & MEM_CLONED != 0,
                scanned_ns: m.scanned_ns.load(Ordering::Relaxed),
            };
            core::sync::atomic::fence(Ordering::Acquire);
            if m.seq.load(Ordering::Relaxed) == before {
                return (before != 0).then_some(figures);
            }
        }
        None
    }

    /// Whether the VMM published the VM as paused (minor 3; false from older writers).
    pub fn paused(&self) -> bool {
        self.region
            .get::<HostHeader>(0)
            .is_some_and(|h| h.vm_state.load(Ordering::Acquire) & VM_PAUSED != 0)
    }

    /// The host sample ring.
    pub fn ring(&self) -> RingView<'a, HostSample> {
        self.ring
    }

    /// Validates the header again; [`AbiError::LayoutChanged`] if layout or generation differ.
    pub fn revalidate(&self) -> Result<(), AbiError> {
        layout::revalidate(&self.region, &self.layout, &self.info)
    }
}

/// A VM's memory sharing, as the host region's [`MemSharing`] block holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemSharingFigures {
    /// Guest RAM, pages.
    pub ram_pages: u64,
    /// Pages that map the template's.
    pub shared_pages: u64,
    /// Pages of the VM's own.
    pub private_pages: u64,
    /// Private pages KSM merged.
    pub merged_pages: u64,
    /// Copy-on-write breaks since the VM started.
    pub cow_breaks: u64,
    /// Whether the RAM is a clone of a template.
    pub cloned: bool,
    /// Host `CLOCK_MONOTONIC` of the scan, ns.
    pub scanned_ns: u64,
}

/// Which guest task a host sample is charged to, derived from a read of the vCPU's slot in the
/// guest region. The task is what the guest claims; the host figures stay the host's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attribution {
    /// Task-table index, or [`TASK_NONE`].
    pub task_id: u32,
    /// Guest thread id, 0 if unknown.
    pub pid: u32,
    /// [`ATTR_SLOT_VALID`], [`ATTR_SWITCHED`], [`ATTR_SLOT_BUSY`].
    pub attr_flags: u32,
    /// The slot's switch count as read (0 if unread).
    pub guest_switch_count: u64,
    /// The slot's flags ([`VCPU_IDLE`], [`VCPU_KTHREAD`]), 0 if unread.
    pub slot_flags: u32,
}

impl Attribution {
    /// From the result of [`GuestRegionView::vcpu`](crate::GuestRegionView::vcpu) at the end of
    /// an interval, and the switch count seen at its start (`None` for the first interval).
    pub fn from_slot(
        slot: Result<VcpuState, ReadError>,
        previous_switch_count: Option<u64>,
    ) -> Self {
        match slot {
            Ok(state) => {
                let switched = previous_switch_count.is_some_and(|prev| prev != state.switch_count);
                Self {
                    task_id: state.task.task_id,
                    pid: state.task.pid,
                    attr_flags: ATTR_SLOT_VALID | if switched { ATTR_SWITCHED } else { 0 },
                    guest_switch_count: state.switch_count,
                    slot_flags: state.task.flags,
                }
            }
            Err(_) => Self {
                task_id: TASK_NONE,
                pid: 0,
                attr_flags: ATTR_SLOT_BUSY,
                guest_switch_count: 0,
                slot_flags: 0,
            },
        }
    }
}

/// How a host record's figures were attributed, from its `attr_flags`: `"exact"` (only the
/// attributed task ran in its intervals), `"sampled"` (charged to the task running when the
/// interval closed, a switch may have gone unannounced), `"merged"` (too many tasks in one tick,
/// charged to none), `"memory"` (a memory record: copy-on-write breaks only, see
/// [`ATTR_MEMORY`]) or `"unattributed"` (the vCPU slot could not be read).
pub fn attribution_name(attr_flags: u32) -> &'static str {
    if attr_flags & ATTR_MEMORY != 0 {
        "memory"
    } else if attr_flags & ATTR_MERGED != 0 {
        "merged"
    } else if attr_flags & ATTR_SLOT_VALID == 0 {
        "unattributed"
    } else if attr_flags & ATTR_EXACT != 0 {
        "exact"
    } else {
        "sampled"
    }
}

impl HostSample {
    /// Copies an [`Attribution`] into the record.
    pub fn set_attribution(&mut self, a: &Attribution) {
        self.task_id = a.task_id;
        self.pid = a.pid;
        self.attr_flags = a.attr_flags;
        self.guest_switch_count = a.guest_switch_count;
        self.slot_flags = a.slot_flags;
    }
}
