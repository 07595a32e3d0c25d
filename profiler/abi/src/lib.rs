//! Shared-memory ABI of Mirrorball's two-level fault profiler.
//!
//! Two memory regions carry the profile (see `profiler/ABI.md` for the full specification):
//!
//! - the **guest region** — mapped into guest physical memory through a virtio shared-memory
//!   region, written by the guest driver (the Linux module via `guest/linux/mirrorball_abi.h`,
//!   or the OS-less Rust guest through this crate): a header, one [`VcpuSlot`] per vCPU naming
//!   the task it runs (updated at every context switch), a [`TaskEntry`] table of registered
//!   tasks, and a ring of [`GuestSample`]s (absolute per-task fault and CPU counters);
//! - the **host region** — written only by the VMM's sampler and never mapped into the guest:
//!   a header and a ring of [`HostSample`]s (per-vCPU KVM fault/exit deltas, host faults and
//!   CPU time of the vCPU thread, attributed to the guest task the vCPU ran).
//!
//! Host processes map both read-only. The guest region is treated as hostile: a reader validates
//! every header field ([`validate_guest_region`]) and every read is bounds-checked, bounded in
//! time and yields plain values or errors — never a panic, an out-of-bounds access or a hang.
//!
//! # Use
//! - Writers: [`GuestRegionLayout::new`] / [`HostRegionLayout::new`], then
//!   [`GuestRegion::format`] / [`HostRegion::format`] (or `attach` to a formatted region), then
//!   [`GuestRegion::vcpu_writer`], [`GuestRegion::task_table`], [`GuestRegion::ring_writer`],
//!   [`HostRegion::ring_writer`].
//! - Readers: [`validate_guest_region`] / [`validate_host_region`] on a [`Region`], then
//!   [`GuestRegionView::vcpu`], [`GuestRegionView::task`], and a [`RingReader`] from
//!   [`RingView::reader`] that reports records in order and every lost one.
//!
//! The memory-access rules (why only atomics, why no `&[u8]`) are in [`region`].
//!
//! The crate is `no_std`, has no dependencies, no `alloc`, no floating point and no panicking
//! paths on untrusted data, so the freestanding user-mode guest can use it as is.
#![no_std]
#![warn(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("the Mirrorball profiler ABI is little-endian");
#[cfg(not(target_has_atomic = "64"))]
compile_error!("the Mirrorball profiler ABI needs 64-bit atomics");

pub mod abi;
pub mod desc;
mod error;
mod guest;
mod host;
mod layout;
pub mod region;
mod ring;
mod tables;

pub use abi::*;
pub use error::{AbiError, Part, ReadError};
pub use guest::{validate_guest_region, GuestRegion, GuestRegionView};
pub use host::{
    attribution_name, validate_host_region, Attribution, HostRegion, HostRegionView,
    MemSharingFigures,
};
pub use layout::{
    GuestRegionLayout, HostRegionLayout, RegionInfo, RegionInit, RingLayout, TableLayout,
};
pub use region::{Region, RegionMut};
pub use ring::{
    GuestSample, HostSample, Poll, RingReader, RingView, RingWriter, SampleRecord, SeqRecord,
};
pub use tables::{
    comm_bytes, comm_from, Comm, CurrentTask, TaskInfo, TaskTableWriter, VcpuSlotWriter, VcpuState,
    SEQLOCK_RETRIES,
};
