//! The sample ring: one producer, any number of lock-free readers, loss detected by sequence.
//!
//! # Writer (one per ring)
//! For record `s = head`, in slot `s % capacity`:
//! 1. `slot.seq = SEQ_WRITING | s` (relaxed), then a release fence — readers of the slot's
//!    previous record now see either the old record intact or a changed `seq`;
//! 2. store the fields (relaxed);
//! 3. `slot.seq = s` (release) — the record is complete;
//! 4. `ctl.head = s + 1` (release) — the record is published.
//!
//! # Reader
//! `h = head` (acquire). Records `max(1, h - capacity) .. h` may be present. To read `s`: load
//! `slot.seq` (acquire); if it is not exactly `s`, the record is not there yet (`NotYetWritten`:
//! smaller, or `SEQ_WRITING | s`) or already replaced (`Overwritten`: larger). Otherwise copy the
//! fields, fence (acquire) and load `slot.seq` again: if it is still `s` the copy is the record,
//! otherwise the writer started replacing it during the copy (`Torn`).
//!
//! A [`RingReader`] walks the sequence numbers in order and reports every gap as
//! [`Poll::Lost`], so a consumer can prove that a long run lost nothing.

use core::marker::PhantomData;
use core::sync::atomic::{fence, AtomicU64, Ordering};

use crate::abi::*;
use crate::desc::Shared;
use crate::error::{AbiError, ReadError};
use crate::layout::RingLayout;
use crate::region::Region;

mod sealed {
    pub trait Sealed {}
}

/// A record type of a sample ring: [`GuestSample`] or [`HostSample`].
///
/// The methods move a record in and out of its shared slot; they are used by [`RingWriter`] and
/// [`RingView`] (sealed: the ABI defines the record types).
pub trait SampleRecord: Copy + core::fmt::Debug + PartialEq + sealed::Sealed {
    /// The shared structure of one ring slot.
    type Slot: Shared;
    /// The slot's sequence number.
    #[doc(hidden)]
    fn seq(slot: &Self::Slot) -> &AtomicU64;
    /// Stores every field of `self` into `slot` (relaxed).
    #[doc(hidden)]
    fn store(&self, slot: &Self::Slot);
    /// Loads every field from `slot` (relaxed).
    #[doc(hidden)]
    fn load(slot: &Self::Slot) -> Self;
}

/// One guest sample: a registered task's ABSOLUTE counters at `timestamp_ns`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuestSample {
    /// Guest clock, ns.
    pub timestamp_ns: u64,
    /// Task-table index.
    pub task_id: u32,
    /// Guest thread id.
    pub pid: u32,
    /// Minor faults since the task started.
    pub min_flt: u64,
    /// Major faults since the task started.
    pub maj_flt: u64,
    /// User CPU time, ns.
    pub utime_ns: u64,
    /// System CPU time, ns.
    pub stime_ns: u64,
    /// vCPU the task last ran on, or [`CPU_NONE`].
    pub cpu: u32,
    /// [`SAMPLE_EXITED`].
    pub flags: u32,
}

impl sealed::Sealed for GuestSample {}

impl SampleRecord for GuestSample {
    type Slot = GuestSampleSlot;

    fn seq(slot: &GuestSampleSlot) -> &AtomicU64 {
        &slot.seq
    }

    fn store(&self, s: &GuestSampleSlot) {
        let r = Ordering::Relaxed;
        s.timestamp_ns.store(self.timestamp_ns, r);
        s.task_id.store(self.task_id, r);
        s.pid.store(self.pid, r);
        s.min_flt.store(self.min_flt, r);
        s.maj_flt.store(self.maj_flt, r);
        s.utime_ns.store(self.utime_ns, r);
        s.stime_ns.store(self.stime_ns, r);
        s.cpu.store(self.cpu, r);
        s.flags.store(self.flags, r);
    }

    fn load(s: &GuestSampleSlot) -> Self {
        let r = Ordering::Relaxed;
        Self {
            timestamp_ns: s.timestamp_ns.load(r),
            task_id: s.task_id.load(r),
            pid: s.pid.load(r),
            min_flt: s.min_flt.load(r),
            maj_flt: s.maj_flt.load(r),
            utime_ns: s.utime_ns.load(r),
            stime_ns: s.stime_ns.load(r),
            cpu: s.cpu.load(r),
            flags: s.flags.load(r),
        }
    }
}

/// One host sample: one vCPU's host-side costs over `interval_ns`, attributed to a guest task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostSample {
    /// Host `CLOCK_MONOTONIC`, ns.
    pub timestamp_ns: u64,
    /// Attributed task-table index (guest-claimed), or [`TASK_NONE`].
    pub task_id: u32,
    /// Attributed guest thread id (guest-claimed), 0 if unknown.
    pub pid: u32,
    /// vCPU index.
    pub vcpu: u32,
    /// [`ATTR_SLOT_VALID`], [`ATTR_SWITCHED`], [`ATTR_SLOT_BUSY`].
    pub attr_flags: u32,
    /// Interval covered by the deltas, ns.
    pub interval_ns: u64,
    /// KVM `pf_taken` delta.
    pub pf_taken: u64,
    /// KVM `pf_fixed` delta.
    pub pf_fixed: u64,
    /// KVM `exits` delta.
    pub exits: u64,
    /// Host minor faults of the vCPU thread (delta).
    pub host_min_flt: u64,
    /// Host major faults of the vCPU thread (delta).
    pub host_maj_flt: u64,
    /// Host user time of the vCPU thread, ns (delta).
    pub vcpu_utime_ns: u64,
    /// Host system time of the vCPU thread, ns (delta).
    pub vcpu_stime_ns: u64,
    /// The vCPU slot's `switch_count` when it was read (guest-claimed).
    pub guest_switch_count: u64,
    /// The vCPU slot's flags of the attributed task (`VCPU_IDLE`, `VCPU_KTHREAD`).
    pub slot_flags: u32,
    /// Announced task switches that closed intervals summed in this record.
    pub switches: u32,
    /// Copy-on-write breaks charged to the task (memory records, `ATTR_MEMORY`).
    pub cow_breaks: u64,
    /// Host run-queue wait of the vCPU thread (steal), ns (delta).
    pub vcpu_wait_ns: u64,
}

impl sealed::Sealed for HostSample {}

impl SampleRecord for HostSample {
    type Slot = HostSampleSlot;

    fn seq(slot: &HostSampleSlot) -> &AtomicU64 {
        &slot.seq
    }

    fn store(&self, s: &HostSampleSlot) {
        let r = Ordering::Relaxed;
        s.timestamp_ns.store(self.timestamp_ns, r);
        s.task_id.store(self.task_id, r);
        s.pid.store(self.pid, r);
        s.vcpu.store(self.vcpu, r);
        s.attr_flags.store(self.attr_flags, r);
        s.interval_ns.store(self.interval_ns, r);
        s.pf_taken.store(self.pf_taken, r);
        s.pf_fixed.store(self.pf_fixed, r);
        s.exits.store(self.exits, r);
        s.host_min_flt.store(self.host_min_flt, r);
        s.host_maj_flt.store(self.host_maj_flt, r);
        s.vcpu_utime_ns.store(self.vcpu_utime_ns, r);
        s.vcpu_stime_ns.store(self.vcpu_stime_ns, r);
        s.guest_switch_count.store(self.guest_switch_count, r);
        s.slot_flags.store(self.slot_flags, r);
        s.switches.store(self.switches, r);
        s.cow_breaks.store(self.cow_breaks, r);
        s.vcpu_wait_ns.store(self.vcpu_wait_ns, r);
    }

    fn load(s: &HostSampleSlot) -> Self {
        let r = Ordering::Relaxed;
        Self {
            timestamp_ns: s.timestamp_ns.load(r),
            task_id: s.task_id.load(r),
            pid: s.pid.load(r),
            vcpu: s.vcpu.load(r),
            attr_flags: s.attr_flags.load(r),
            interval_ns: s.interval_ns.load(r),
            pf_taken: s.pf_taken.load(r),
            pf_fixed: s.pf_fixed.load(r),
            exits: s.exits.load(r),
            host_min_flt: s.host_min_flt.load(r),
            host_maj_flt: s.host_maj_flt.load(r),
            vcpu_utime_ns: s.vcpu_utime_ns.load(r),
            vcpu_stime_ns: s.vcpu_stime_ns.load(r),
            guest_switch_count: s.guest_switch_count.load(r),
            slot_flags: s.slot_flags.load(r),
            switches: s.switches.load(r),
            cow_breaks: s.cow_breaks.load(r),
            vcpu_wait_ns: s.vcpu_wait_ns.load(r),
        }
    }
}

/// A record together with its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqRecord<R> {
    /// Sequence number (≥ [`SEQ_FIRST`]).
    pub seq: u64,
    /// The record.
    pub record: R,
}

/// Read access to a validated ring; cheap to copy.
pub struct RingView<'a, R> {
    region: Region<'a>,
    layout: RingLayout,
    head: &'a AtomicU64,
    _record: PhantomData<fn() -> R>,
}

impl<R> Clone for RingView<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for RingView<'_, R> {}

impl<R> core::fmt::Debug for RingView<'_, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RingView")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl<'a, R: SampleRecord> RingView<'a, R> {
    /// A view of the ring at `layout`, which must have been validated against `region`.
    pub(crate) fn new(region: Region<'a>, layout: RingLayout) -> Result<Self, AbiError> {
        let ctl: &RingCtl = region
            .get(layout.ctl_offset)
            .ok_or(AbiError::OutOfBounds(crate::Part::RingCtl))?;
        if layout.slots.stride < core::mem::size_of::<R::Slot>() {
            return Err(AbiError::BadStride {
                part: crate::Part::RingSlots,
                stride: u32::try_from(layout.slots.stride).unwrap_or(u32::MAX),
            });
        }
        Ok(Self {
            region,
            layout,
            head: &ctl.head,
            _record: PhantomData,
        })
    }

    /// Records the ring holds.
    pub fn capacity(&self) -> u32 {
        self.layout.slots.capacity
    }

    /// The ring's layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The next sequence number the writer will write (acquire: records below it that are still
    /// in the ring are complete).
    pub fn head(&self) -> u64 {
        let head = self.head.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        head
    }

    /// The oldest sequence number that may still be in the ring when the head is `head`.
    pub fn oldest(&self, head: u64) -> u64 {
        head.saturating_sub(u64::from(self.capacity()))
            .max(SEQ_FIRST)
    }

    fn slot(&self, seq: u64) -> Option<&'a R::Slot> {
        let index = seq % u64::from(self.capacity());
        self.region.entry(
            self.layout.slots.offset,
            self.layout.slots.stride,
            usize::try_from(index).ok()?,
        )
    }

    /// Reads the record with sequence number `seq`, if the ring holds it intact.
    pub fn read(&self, seq: u64) -> Result<SeqRecord<R>, ReadError> {
        if seq < SEQ_FIRST || seq & SEQ_WRITING != 0 {
            return Err(ReadError::OutOfRange);
        }
        let slot = self.slot(seq).ok_or(ReadError::OutOfRange)?;
        let before = R::seq(slot).load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if before != seq {
            let found = before & !SEQ_WRITING;
            return Err(if found > seq {
                ReadError::Overwritten
            } else {
                ReadError::NotYetWritten
            });
        }
        let record = R::load(slot);
        fence(Ordering::Acquire);
        if R::seq(slot).load(Ordering::Relaxed) != seq {
            return Err(ReadError::Torn);
        }
        Ok(SeqRecord { seq, record })
    }

    /// A reader that starts at the oldest record the ring holds now.
    pub fn reader(&self) -> RingReader<'a, R> {
        RingReader::starting_at(*self, self.oldest(self.head()))
    }

    /// A reader that starts at the current head (only records written from now on).
    pub fn reader_from_head(&self) -> RingReader<'a, R> {
        RingReader::starting_at(*self, self.head().max(SEQ_FIRST))
    }
}

/// What [`RingReader::poll`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll<R> {
    /// The next record, in sequence order.
    Record(SeqRecord<R>),
    /// Nothing new since the last record.
    Empty,
    /// Records `first .. first + count` were overwritten before they could be read; the reader
    /// skipped to the oldest record the ring still holds.
    Lost {
        /// First lost sequence number.
        first: u64,
        /// Number of lost records.
        count: u64,
    },
    /// The head moved backwards (the region was reformatted, or the writer is misbehaving); the
    /// reader restarted at the oldest record.
    Regressed {
        /// Where the reader was.
        from: u64,
        /// The head it found.
        head: u64,
    },
}

/// Reads a ring in sequence order and accounts for every record: read or lost.
///
/// Each [`poll`](Self::poll) does a bounded amount of work and always makes progress on a
/// writer that misbehaves, so a hostile writer can make it report garbage or losses, never hang it.
#[derive(Clone, Copy, Debug)]
pub struct RingReader<'a, R> {
    view: RingView<'a, R>,
    next: u64,
    read: u64,
    lost: u64,
}

impl<'a, R: SampleRecord> RingReader<'a, R> {
    /// A reader whose next record is `seq`.
    pub fn starting_at(view: RingView<'a, R>, seq: u64) -> Self {
        Self {
            view,
            next: seq.max(SEQ_FIRST),
            read: 0,
            lost: 0,
        }
    }

    /// The ring.
    pub fn view(&self) -> &RingView<'a, R> {
        &self.view
    }

    /// Sequence number of the next record this reader expects.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Records returned so far.
    pub fn read_count(&self) -> u64 {
        self.read
    }

    /// Records reported lost so far.
    pub fn lost_count(&self) -> u64 {
        self.lost
    }

    fn skip_to(&mut self, target: u64) -> Poll<R> {
        let first = self.next;
        let count = target - first;
        self.next = target;
        self.lost = self.lost.saturating_add(count);
        Poll::Lost { first, count }
    }

    /// The next record, or why there is none.
    pub fn poll(&mut self) -> Poll<R> {
        let head = self.view.head();
        if self.next > head {
            let from = self.next;
            self.next = self.view.oldest(head);
            return Poll::Regressed { from, head };
        }
        if self.next == head {
            return Poll::Empty;
        }
        let oldest = self.view.oldest(head);
        if self.next < oldest {
            return self.skip_to(oldest);
        }
        match self.view.read(self.next) {
            Ok(record) => {
                self.next += 1;
                self.read += 1;
                Poll::Record(record)
            }
            Err(ReadError::Overwritten) | Err(ReadError::Torn) => {
                // Lapped: resynchronise to the oldest record the ring holds now.
                let oldest = self.view.oldest(self.view.head());
                let target = oldest.max(self.next.saturating_add(1));
                self.skip_to(target)
            }
            // `next < head`, so a correct writer has completed this record; a slot that is stale
            // or unreadable means the writer broke the protocol. Count it lost and move on.
            Err(_) => self.skip_to(self.next.saturating_add(1)),
        }
    }
}

/// The single producer of a ring. Not `Clone`: one writer per ring.
pub struct RingWriter<'a, R> {
    view: RingView<'a, R>,
    next: u64,
}

impl<R> core::fmt::Debug for RingWriter<'_, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RingWriter")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl<'a, R: SampleRecord> RingWriter<'a, R> {
    /// Takes over the ring, continuing at its current head. `view` must be of writable memory.
    pub(crate) fn attach(view: RingView<'a, R>) -> Result<Self, AbiError> {
        let head = view.head.load(Ordering::Relaxed);
        if head < SEQ_FIRST || head & SEQ_WRITING != 0 {
            return Err(AbiError::BadHead(head));
        }
        Ok(Self { view, next: head })
    }

    /// Sequence number the next [`push`](Self::push) will use.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Records the ring holds.
    pub fn capacity(&self) -> u32 {
        self.view.capacity()
    }

    /// Writes `record` as the next sequence number and publishes it; returns that number.
    pub fn push(&mut self, record: &R) -> u64 {
        let seq = self.next;
        if let Some(slot) = self.view.slot(seq) {
            let slot_seq = R::seq(slot);
            slot_seq.store(SEQ_WRITING | seq, Ordering::Relaxed);
            fence(Ordering::Release);
            record.store(slot);
            slot_seq.store(seq, Ordering::Release);
            self.view.head.store(seq + 1, Ordering::Release);
        } else {
            // Unreachable: the layout was validated against the region.
            debug_assert!(false, "ring slot outside the region");
        }
        self.next = seq + 1;
        seq
    }
}
