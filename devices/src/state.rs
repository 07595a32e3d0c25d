//! Saved device state for snapshots: one plain, serialisable structure per device, taken with
//! the device's `state()` and written back into a freshly built device with its `restore()`.
//! Restoring treats the saved state as untrusted input (a snapshot file is a user's file): every
//! value is checked against what the device could have held, and a bad one is refused with one
//! line ([`StateError`]) instead of being loaded.
use serde::{Deserialize, Serialize};

/// A saved state a device refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{device} state: {why}")]
pub struct StateError {
    /// The device.
    pub device: &'static str,
    /// What is wrong.
    pub why: String,
}

impl StateError {
    /// An error about `device`.
    pub fn new(device: &'static str, why: impl Into<String>) -> Self {
        Self {
            device,
            why: why.into(),
        }
    }
}

/// The 16550A UART's registers and receive FIFO.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    /// Divisor latch, low and high byte.
    pub divisor: [u8; 2],
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes waiting in the receive FIFO.
    pub rx_fifo: Vec<u8>,
}

/// The i8042 controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// Controller configuration byte.
    pub ctr: u8,
    /// Output port.
    pub output_port: u8,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
    /// The data byte a pending command waits for (0: none).
    pub pending: u8,
    /// The output buffer: (byte, from the AUX port).
    pub out: Vec<(u8, bool)>,
    /// The last byte read from the data port.
    pub last_read: u8,
}

/// The CMOS RTC: the index register and the 128 bytes of CMOS RAM (the time itself is the
/// host's, read on every access).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtcState {
    /// The selected register.
    pub index: u8,
    /// CMOS RAM.
    pub ram: Vec<u8>,
}

/// One virtqueue as the driver configured it, and where the device is in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// Size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in effect.
    pub event_idx: bool,
}

/// A virtio-mmio transport's registers and queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// Device status.
    pub status: u8,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Accepted features 0..64.
    pub driver_features: u64,
    /// The driver wrote a feature word beyond bit 63.
    pub driver_features_beyond: bool,
    /// `SHMSel`.
    pub shm_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Every queue, in order.
    pub queues: Vec<QueueState>,
}

/// The profiler device: its transport and what the guest set in its configuration space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilerDeviceState {
    /// The transport.
    pub transport: TransportState,
    /// The period the guest requested (clamped), 0 if none.
    pub requested_period_ns: u64,
    /// Bytes of a period written but not committed.
    pub staged_period: [u8; 8],
}

/// The virtio-blk device: its transport (status, features, queue and ring positions) and the
/// disk geometry and features it offered, which a restored device must offer alike. (Its
/// configuration space follows from the capacity; the disk's data is saved apart.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceState {
    /// The transport.
    pub transport: TransportState,
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Features offered.
    pub device_features: u64,
}
