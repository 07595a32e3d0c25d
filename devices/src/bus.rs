//! Address-range dispatch for port I/O and MMIO exits.
//!
//! This module owns the [`Bus`]: a map from non-overlapping address ranges to
//! devices, and the [`BusDevice`] trait those devices implement. The VMM builds
//! one bus for the I/O port space and one for MMIO, inserts its devices, then
//! shares each bus with every vCPU thread behind an `Arc<Bus>`.
//!
//! # Locking
//!
//! [`Bus::insert`] takes `&mut self`, so all insertions happen while the VMM
//! still owns the bus exclusively, before the vCPUs start. Once it is wrapped in
//! an `Arc` the map is read-only, and lookups need no lock at all. Each device
//! sits behind its own `Mutex`, taken only for the duration of one access, so
//! two vCPUs hitting different devices never contend. A device whose mutex was
//! poisoned (a panic while it was held) keeps being served: the guard is
//! recovered with [`PoisonError::into_inner`] instead of panicking the VMM.
//!
//! # Unmapped accesses
//!
//! An access to an address no device covers, or one that straddles the end of
//! a device's range, is unmapped: reads see all bits set (`0xff` bytes, like a
//! floating bus on real hardware), writes are dropped, and
//! [`Bus::read`]/[`Bus::write`] return `false`. The bus counts these so the
//! VMM can report them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A device reachable through a [`Bus`].
///
/// `offset` is relative to the base of the range the device was inserted at,
/// and `offset + data.len()` never exceeds that range's length. `data` can be
/// any size the guest used (1, 2, 4 or 8 bytes in practice); devices must
/// handle every size and every offset without panicking.
pub trait BusDevice: Send {
    /// Handles a guest read: fill `data` with the value at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a [`Bus`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// A range must cover at least one address.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// `base + len` does not fit in the 64-bit address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range intersects one already inserted.
    #[error(
        "bus range {base:#x}+{len:#x} overlaps existing range {existing_base:#x}+{existing_len:#x}"
    )]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range it overlaps.
        existing_base: u64,
        /// Length of the range it overlaps.
        existing_len: u64,
    },
}

/// A device shared between the bus and whoever else needs to reach it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct BusRange {
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping address ranges mapped to devices, with counters of the
/// accesses that hit no device.
///
/// See the module documentation for the locking scheme.
#[derive(Default)]
pub struct Bus {
    /// Keyed by range base.
    ranges: BTreeMap<u64, BusRange>,
    unmapped_reads: AtomicU64,
    unmapped_writes: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self.ranges.iter().map(|(b, r)| (*b, r.len)).collect();
        f.debug_struct("Bus")
            .field("ranges", &ranges)
            .field("unmapped_reads", &self.unmapped_reads())
            .field("unmapped_writes", &self.unmapped_writes())
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    ///
    /// Fails if `len` is zero, if `base + len` overflows `u64`, or if the range
    /// intersects one already mapped.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        let overlap = |existing_base: u64, existing: &BusRange| BusError::Overlap {
            base,
            len,
            existing_base,
            existing_len: existing.len,
        };
        // The closest range starting at or below `base` must end at or before it.
        if let Some((&prev_base, prev)) = self.ranges.range(..=base).next_back() {
            // Inserted ranges never overflow, so this addition cannot either.
            if prev_base + prev.len > base {
                return Err(overlap(prev_base, prev));
            }
        }
        // The closest range starting above `base` must start at or after `end`.
        if let Some((&next_base, next)) = self.ranges.range(base..).next() {
            if next_base < end {
                return Err(overlap(next_base, next));
            }
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    /// Number of mapped ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no range is mapped.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The device covering the whole access `[addr, addr + size)`, with the
    /// access offset relative to the device's base. `None` when no device
    /// covers it entirely (including empty accesses).
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let size = u64::try_from(size).ok().filter(|&s| s > 0)?;
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let access_end = offset.checked_add(size)?;
        (access_end <= range.len).then_some((offset, &range.device))
    }

    /// Dispatches a read of `data.len()` bytes at `addr`.
    ///
    /// Returns `false` when no device covers the whole access; `data` is then
    /// filled with `0xff` and the access is counted in [`Bus::unmapped_reads`].
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unmapped_reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatches a write of `data` at `addr`.
    ///
    /// Returns `false` when no device covers the whole access; the write is
    /// then dropped and counted in [`Bus::unmapped_writes`].
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => {
                self.unmapped_writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Reads that hit no device since the bus was created.
    pub fn unmapped_reads(&self) -> u64 {
        self.unmapped_reads.load(Ordering::Relaxed)
    }

    /// Writes that hit no device since the bus was created.
    pub fn unmapped_writes(&self) -> u64 {
        self.unmapped_writes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access it sees; reads return `offset + i` per byte.
    #[derive(Default)]
    struct Recorder {
        reads: Vec<(u64, usize)>,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            for (i, b) in data.iter_mut().enumerate() {
                *b = ((offset & 0xff) as u8).wrapping_add(i.to_le_bytes()[0]);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn insert_rejects_zero_length_overflow_and_overlap() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(0x10, 0, recorder()),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, recorder()),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(0x100, 0x10, recorder()).unwrap();
        // Same base, inside, straddling either end, enclosing.
        for (base, len) in [
            (0x100, 1),
            (0x108, 2),
            (0xf8, 0x9),
            (0x10f, 0x10),
            (0xff, 0x20),
        ] {
            assert_eq!(
                bus.insert(base, len, recorder()),
                Err(BusError::Overlap {
                    base,
                    len,
                    existing_base: 0x100,
                    existing_len: 0x10
                }),
                "{base:#x}+{len:#x}"
            );
        }
        // Adjacent on both sides is fine.
        bus.insert(0xf0, 0x10, recorder()).unwrap();
        bus.insert(0x110, 0x10, recorder()).unwrap();
        // The very top of the address space is usable.
        bus.insert(u64::MAX - 1, 1, recorder()).unwrap();
        assert_eq!(bus.len(), 4);
    }

    #[test]
    fn dispatch_uses_offsets_relative_to_the_range_base() {
        let mut bus = Bus::new();
        let a = recorder();
        let b = recorder();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, b.clone()).unwrap();

        let mut data = [0u8; 2];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2, 3]);
        assert!(bus.write(0x3ff, &[0xaa]));
        assert!(bus.write(0x64, &[0xfe]));

        let a = a.lock().unwrap();
        assert_eq!(a.reads, vec![(2, 2)]);
        assert_eq!(a.writes, vec![(7, vec![0xaa])]);
        assert_eq!(b.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert_eq!(bus.unmapped_reads(), 0);
        assert_eq!(bus.unmapped_writes(), 0);
    }

    #[test]
    fn unmapped_reads_are_all_ones_and_counted() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, recorder()).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x80, &mut data));
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 8];
        assert!(!bus.read(0x1100, &mut data));
        assert_eq!(data, [0xff; 8]);
        assert!(!bus.write(0xfff, &[1]));
        assert_eq!(bus.unmapped_reads(), 2);
        assert_eq!(bus.unmapped_writes(), 1);
    }

    #[test]
    fn straddling_access_is_unmapped() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(0x1000, 0x10, dev.clone()).unwrap();
        bus.insert(0x1010, 0x10, recorder()).unwrap();
        let mut data = [0u8; 4];
        // Last 2 bytes of the first range plus 2 of the second.
        assert!(!bus.read(0x100e, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x100e, &[1, 2, 3, 4]));
        // Fits exactly at the end.
        assert!(bus.read(0x100c, &mut data));
        // Near the top of the address space, the end computation must not overflow.
        let mut bus = Bus::new();
        bus.insert(u64::MAX - 4, 4, recorder()).unwrap();
        assert!(!bus.read(u64::MAX - 1, &mut [0u8; 8]));
        assert!(bus.read(u64::MAX - 4, &mut [0u8; 4]));
        assert_eq!(dev.lock().unwrap().reads, vec![(0xc, 4)]);
    }

    #[test]
    fn empty_access_is_unmapped() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(0, 0x10, dev.clone()).unwrap();
        assert!(!bus.read(0, &mut []));
        assert!(!bus.write(0, &[]));
        let dev = dev.lock().unwrap();
        assert!(dev.reads.is_empty() && dev.writes.is_empty());
    }

    #[test]
    fn poisoned_device_is_still_served() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(0x10, 1, dev.clone()).unwrap();
        let poisoner = dev.clone();
        let result = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(result.is_err());
        assert!(dev.is_poisoned());
        assert!(bus.write(0x10, &[7]));
        let mut data = [0u8; 1];
        assert!(bus.read(0x10, &mut data));
        assert_eq!(data, [0]);
    }

    #[test]
    fn bus_is_shared_across_threads() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(0, 8, dev.clone()).unwrap();
        let bus = Arc::new(bus);
        let handles: Vec<_> = (0..4u8)
            .map(|i| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        assert!(bus.write(u64::from(i), &[i]));
                        assert!(!bus.write(0x100, &[i]));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(dev.lock().unwrap().writes.len(), 400);
        assert_eq!(bus.unmapped_writes(), 400);
    }
}
