//! Walking the guest sample ring in sequence order, accounting for every sequence number: read
//! intact, or lost — and if lost, why.
//!
//! This is `RingReader::poll` of the ABI crate (`profiler/ABI.md` §5.4) with the losses split by
//! cause, which the monitor reports at the end:
//!
//! | Cause | Meaning |
//! |---|---|
//! | `overwritten` | the writer lapped the reader: the slot already holds (or is being rewritten with) a newer record, or the record fell out of the ring before it was read |
//! | `torn` | the record was overwritten while it was being copied (the sequence changed between the two loads) |
//! | `stale` | below the head but the slot holds an older or garbage sequence: a writer that broke the protocol |
//!
//! Only records whose sequence number was read twice, identical, around the copy are returned;
//! anything else is counted and skipped. `read + lost()` always equals the number of sequence
//! numbers passed over. Each [`Walker::step`] does a bounded amount of work and moves forward or
//! reports `Empty`, so a hostile writer cannot hang the monitor.

use mirrorball_profiler_abi::{GuestSample, ReadError, RingView, SeqRecord, SEQ_FIRST};

/// Why records were skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    /// Lapped by the writer.
    Overwritten,
    /// Overwritten during the copy.
    Torn,
    /// Left stale by a misbehaving writer.
    Stale,
}

/// Records read and lost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records returned intact.
    pub read: u64,
    /// Records lost because the writer lapped the reader.
    pub overwritten: u64,
    /// Records lost because they changed during the copy.
    pub torn: u64,
    /// Records lost because their slot held a stale sequence.
    pub stale: u64,
    /// Times the head went backwards (region reformatted, or a misbehaving writer).
    pub regressed: u64,
}

impl Counts {
    /// Records lost, all causes.
    pub fn lost(&self) -> u64 {
        self.overwritten
            .saturating_add(self.torn)
            .saturating_add(self.stale)
    }

    fn add(&mut self, kind: LossKind, count: u64) {
        let c = match kind {
            LossKind::Overwritten => &mut self.overwritten,
            LossKind::Torn => &mut self.torn,
            LossKind::Stale => &mut self.stale,
        };
        *c = c.saturating_add(count);
    }
}

/// What one [`Walker::step`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The next record, intact.
    Record(SeqRecord<GuestSample>),
    /// Nothing new.
    Empty,
    /// `count` records from `first` were skipped.
    Lost {
        /// First skipped sequence number.
        first: u64,
        /// Records skipped.
        count: u64,
        /// Why (the first of them; the rest of a skip are always `Overwritten`).
        kind: LossKind,
    },
    /// The head went backwards; the walker restarted at the oldest record.
    Regressed {
        /// Where the walker was.
        from: u64,
        /// The head it found.
        head: u64,
    },
}

/// Reads the guest ring in order.
#[derive(Clone, Copy, Debug)]
pub struct Walker<'a> {
    view: RingView<'a, GuestSample>,
    next: u64,
    counts: Counts,
}

impl<'a> Walker<'a> {
    /// A walker starting at the oldest record the ring holds now.
    pub fn from_oldest(view: RingView<'a, GuestSample>) -> Self {
        let next = view.oldest(view.head());
        Self::starting_at(view, next)
    }

    /// A walker starting at the current head (only records written from now on).
    pub fn from_head(view: RingView<'a, GuestSample>) -> Self {
        let next = view.head();
        Self::starting_at(view, next)
    }

    /// A walker whose next record is `seq`.
    pub fn starting_at(view: RingView<'a, GuestSample>, seq: u64) -> Self {
        Self {
            view,
            next: seq.clamp(SEQ_FIRST, mirrorball_profiler_abi::SEQ_WRITING - 1),
            counts: Counts::default(),
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The next sequence number expected.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    fn skip(&mut self, target: u64, kind: LossKind) -> Step {
        let first = self.next;
        let count = target.saturating_sub(first).max(1);
        self.next = first.saturating_add(count);
        self.counts.add(kind, 1);
        self.counts.add(LossKind::Overwritten, count - 1);
        Step::Lost { first, count, kind }
    }

    /// The next record, or why there is none.
    pub fn step(&mut self) -> Step {
        let head = self.view.head();
        if self.next > head {
            let from = self.next;
            self.next = self.view.oldest(head);
            self.counts.regressed = self.counts.regressed.saturating_add(1);
            return Step::Regressed { from, head };
        }
        if self.next == head {
            return Step::Empty;
        }
        let oldest = self.view.oldest(head);
        if self.next < oldest {
            return self.skip(oldest, LossKind::Overwritten);
        }
        match self.view.read(self.next) {
            Ok(record) => {
                self.next = self.next.saturating_add(1);
                self.counts.read = self.counts.read.saturating_add(1);
                Step::Record(record)
            }
            Err(e @ (ReadError::Overwritten | ReadError::Torn)) => {
                // Lapped: resynchronise to the oldest record the ring holds now.
                let oldest = self.view.oldest(self.view.head());
                let kind = if e == ReadError::Torn {
                    LossKind::Torn
                } else {
                    LossKind::Overwritten
                };
                self.skip(oldest.max(self.next.saturating_add(1)), kind)
            }
            // `next < head`, so a correct writer completed this record: the slot is stale.
            Err(_) => self.skip(self.next.saturating_add(1), LossKind::Stale),
        }
    }
}
