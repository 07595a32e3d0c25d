//! The virtqueue registers of the virtio-mmio transport (§4.2.2, §4.2.3.2).
//!
//! This module owns a device's split virtqueues ([`virtio_queue::Queue`],
//! from the rust-vmm `virtio-queue` crate) and the guest's view of them:
//! `QueueSel`, `QueueNumMax`, `QueueNum`, `QueueReady` and the descriptor
//! table, driver (available) and device (used) ring addresses. The queues'
//! contents are only ever read by the backend that processes them (see
//! [`super::VirtioBackend::queue_notify`]); this module only holds the
//! configuration the driver wrote.
//!
//! Rules, all guest-controlled input:
//! * a queue register write needs `FEATURES_OK` (§3.1.1: queues are set up
//!   after feature negotiation) and no `FAILED`;
//! * `QueueSel` may name any index; a queue that does not exist reads
//!   `QueueNumMax` 0 and `QueueReady` 0, and writes to it are refused;
//! * `QueueNum` and the addresses can only change while the queue is not
//!   ready; `QueueNum` must be a power of two no larger than `QueueNumMax`,
//!   the descriptor table 16-aligned, the available ring 2-aligned and the
//!   used ring 4-aligned;
//! * `QueueReady` accepts 0 or 1.
//!
//! A refused write leaves the queue unchanged and is reported to the
//! transport, which counts it as a protocol error.
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::regs;

/// Why a queue register write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refused;

/// The queues of one device and the queue selector.
#[derive(Debug)]
pub(super) struct QueueRegisters {
    queues: Vec<Queue>,
    sel: u32,
}

/// Which half of a 64-bit address register a write sets.
#[derive(Clone, Copy)]
enum Half {
    Low,
    High,
}

fn with_half(old: u64, half: Half, value: u32) -> u64 {
    match half {
        Half::Low => (old & !0xffff_ffff) | u64::from(value),
        Half::High => (old & 0xffff_ffff) | (u64::from(value) << 32),
    }
}

impl QueueRegisters {
    /// Queues of the given maximum sizes (each a power of two, at most
    /// 32768; an invalid size gives a queue of size 1 rather than none, so
    /// queue indices keep matching the backend's).
    pub(super) fn new(max_sizes: &[u16]) -> Self {
        let queues = max_sizes
            .iter()
            .map(|&max| Queue::new(max).or_else(|_| Queue::new(1)))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        Self { queues, sel: 0 }
    }

    /// All queues, for the backend.
    pub(super) fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// All queues.
    pub(super) fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// `QueueSel`.
    pub(super) fn sel(&self) -> u32 {
        self.sel
    }

    /// Replaces the selector and the queues (a restored snapshot; the caller checked that
    /// `queues` matches the device's queue count and sizes).
    pub(super) fn load(&mut self, sel: u32, queues: Vec<Queue>) {
        self.sel = sel;
        self.queues = queues;
    }

    /// Whether `index` names a queue.
    pub(super) fn exists(&self, index: u32) -> bool {
        usize::try_from(index).is_ok_and(|i| i < self.queues.len())
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.sel).ok()?)
    }

    fn selected_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::try_from(self.sel).ok()?)
    }

    /// Forgets everything the driver set (device reset).
    pub(super) fn reset(&mut self) {
        self.sel = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
    }

    /// The value of a readable queue register, `None` if `reg` is not one.
    pub(super) fn read(&self, reg: u64) -> Option<u32> {
        match reg {
            regs::QUEUE_NUM_MAX => Some(self.selected().map_or(0, |q| u32::from(q.max_size()))),
            regs::QUEUE_READY => Some(self.selected().map_or(0, |q| u32::from(q.ready()))),
            _ => None,
        }
    }

    /// Whether `reg` is a writable queue register (other than `QueueNotify`,
    /// which the transport handles).
    pub(super) fn is_writable(reg: u64) -> bool {
        matches!(
            reg,
            regs::QUEUE_SEL
                | regs::QUEUE_NUM
                | regs::QUEUE_READY
                | regs::QUEUE_DESC_LOW
                | regs::QUEUE_DESC_HIGH
                | regs::QUEUE_DRIVER_LOW
                | regs::QUEUE_DRIVER_HIGH
                | regs::QUEUE_DEVICE_LOW
                | regs::QUEUE_DEVICE_HIGH
        )
    }

    /// Applies a write to a queue register (one [`Self::is_writable`]
    /// accepts) while the driver may configure queues.
    pub(super) fn write(&mut self, reg: u64, value: u32) -> Result<(), Refused> {
        if reg == regs::QUEUE_SEL {
            self.sel = value;
            return Ok(());
        }
        let queue = self.selected_mut().ok_or(Refused)?;
        if reg == regs::QUEUE_READY {
            return match value {
                0 | 1 => {
                    queue.set_ready(value == 1);
                    Ok(())
                }
                _ => Err(Refused),
            };
        }
        if queue.ready() {
            // §4.2.3.2: the driver configures a queue before enabling it.
            return Err(Refused);
        }
        let set = |queue: &mut Queue, half: Half, which: u64| -> Result<(), Refused> {
            match which {
                regs::QUEUE_DESC_LOW => queue
                    .try_set_desc_table_address(GuestAddress(with_half(
                        queue.desc_table(),
                        half,
                        value,
                    )))
                    .map_err(|_| Refused),
                regs::QUEUE_DRIVER_LOW => queue
                    .try_set_avail_ring_address(GuestAddress(with_half(
                        queue.avail_ring(),
                        half,
                        value,
                    )))
                    .map_err(|_| Refused),
                _ => queue
                    .try_set_used_ring_address(GuestAddress(with_half(
                        queue.used_ring(),
                        half,
                        value,
                    )))
                    .map_err(|_| Refused),
            }
        };
        match reg {
            regs::QUEUE_NUM => {
                let size = u16::try_from(value).map_err(|_| Refused)?;
                queue.try_set_size(size).map_err(|_| Refused)
            }
            regs::QUEUE_DESC_LOW | regs::QUEUE_DRIVER_LOW | regs::QUEUE_DEVICE_LOW => {
                set(queue, Half::Low, reg)
            }
            regs::QUEUE_DESC_HIGH => set(queue, Half::High, regs::QUEUE_DESC_LOW),
            regs::QUEUE_DRIVER_HIGH => set(queue, Half::High, regs::QUEUE_DRIVER_LOW),
            regs::QUEUE_DEVICE_HIGH => set(queue, Half::High, regs::QUEUE_DEVICE_LOW),
            _ => Err(Refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configures_only_existing_unready_queues_with_valid_values() {
        let mut q = QueueRegisters::new(&[256, 16]);
        assert_eq!(q.read(regs::QUEUE_NUM_MAX), Some(256));
        q.write(regs::QUEUE_SEL, 1).unwrap();
        assert_eq!(q.read(regs::QUEUE_NUM_MAX), Some(16));
        assert_eq!(q.write(regs::QUEUE_NUM, 32), Err(Refused));
        assert_eq!(q.write(regs::QUEUE_NUM, 12), Err(Refused));
        assert_eq!(q.write(regs::QUEUE_NUM, 0), Err(Refused));
        q.write(regs::QUEUE_NUM, 8).unwrap();
        assert_eq!(q.write(regs::QUEUE_DESC_LOW, 0x1008), Err(Refused));
        q.write(regs::QUEUE_DESC_LOW, 0x1000).unwrap();
        q.write(regs::QUEUE_DESC_HIGH, 1).unwrap();
        q.write(regs::QUEUE_DRIVER_LOW, 0x2000).unwrap();
        q.write(regs::QUEUE_DEVICE_LOW, 0x3000).unwrap();
        assert_eq!(q.write(regs::QUEUE_READY, 2), Err(Refused));
        q.write(regs::QUEUE_READY, 1).unwrap();
        assert_eq!(q.read(regs::QUEUE_READY), Some(1));
        // A ready queue keeps its configuration.
        assert_eq!(q.write(regs::QUEUE_NUM, 4), Err(Refused));
        let queue = &q.queues()[1];
        assert_eq!(queue.size(), 8);
        assert_eq!(queue.desc_table(), 0x1_0000_1000);
        assert_eq!(queue.avail_ring(), 0x2000);
        assert_eq!(queue.used_ring(), 0x3000);
        // Queues that do not exist.
        q.write(regs::QUEUE_SEL, u32::MAX).unwrap();
        assert_eq!(q.read(regs::QUEUE_NUM_MAX), Some(0));
        assert_eq!(q.read(regs::QUEUE_READY), Some(0));
        assert_eq!(q.write(regs::QUEUE_READY, 1), Err(Refused));
        q.reset();
        assert!(!q.queues()[1].ready());
        assert_eq!(q.read(regs::QUEUE_NUM_MAX), Some(256));
    }
}
