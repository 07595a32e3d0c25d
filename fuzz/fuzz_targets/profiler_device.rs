//! The profiler device (virtio-mmio transport) as a hostile guest sees it: `ProfilerDevice` behind
//! an MMIO `Bus`, hit with any sequence of reads and writes (any offset in, around or far from its
//! 4 KiB window, any size 0..=8, any data), driver-like status and feature writes that reach the
//! deeper states, requested-period writes split like Linux does, and host-side configuration
//! changes in between.
//!
//! Input: a sequence of operations, each starting with an opcode byte (`op % 8`):
//! * 0, 1: read — offset selector, size (no data)
//! * 2, 3: write — offset selector, size, `size` data bytes
//! * 4: `Status` write — a byte: below 0x80, one of the driver's steps (reset, ACK, +DRIVER,
//!   +FEATURES_OK, +DRIVER_OK); from 0x80, the byte itself as a raw status value (FAILED is bit 7)
//! * 5: `DriverFeaturesSel` (a byte, 0..=3) then `DriverFeatures` (4 bytes)
//! * 6: `requested_period_ns` — 8 value bytes, then a split byte: one 8-byte write, low/high 4-byte
//!   writes, or eight 1-byte writes
//! * 7: host side — a selector byte: `update_default_period` (8 bytes), `set_sampler_active`,
//!   `set_needs_reset`, or an `InterruptACK` write (4 bytes)
//!
//! Checked on every operation: nothing panics; an access is dispatched exactly when it lies inside
//! the window; `bad_accesses` grows exactly for the accesses an independent model of the register
//! table calls malformed, and those reads return zeros; the identity registers always read their
//! constants; the status is a valid prefix of the initialisation sequence (DRIVER_OK implies
//! FEATURES_OK implies DRIVER implies ACKNOWLEDGE), negotiated features include VERSION_1 and are a
//! subset of the offered ones; the lock-free `ProfilerControl` agrees with the device; a requested
//! period is within bounds; `InterruptStatus` holds only the config-change bit; `ConfigGeneration`
//! and every counter never go down. At the end, the interrupt eventfd was signalled exactly
//! `config_interrupts` times.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use mirrorball_devices::bus::Bus;
use mirrorball_devices::profiler_device::{
    config, ProfilerDevice, ProfilerDeviceConfig, MAX_PERIOD_NS, MIN_PERIOD_NS, PROFILER_DEVICE_ID,
    PROFILER_F_PERIOD_CONTROL, PROFILER_VENDOR_ID,
};
use mirrorball_devices::virtio_mmio::{
    regs, status as st, CONFIG_SPACE_OFFSET, INTERRUPT_CONFIG_CHANGE, MMIO_MAGIC_VALUE,
    MMIO_VERSION, VIRTIO_F_VERSION_1, VIRTIO_MMIO_WINDOW,
};
use mirrorball_devices::EventFdTrigger;
use mirrorball_fuzz::Bytes;

const BASE: u64 = 0xd000_0000;
const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << PROFILER_F_PERIOD_CONTROL);

/// Registers a well-formed read may target.
const READABLE: &[u64] = &[
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x034, 0x044, 0x060, 0x070, 0x0b0, 0x0b4, 0x0b8, 0x0bc,
    0x0c0, 0x0fc,
];
/// Registers a well-formed write may target.
const WRITABLE: &[u64] = &[
    0x014, 0x020, 0x024, 0x030, 0x038, 0x044, 0x050, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094,
    0x0a0, 0x0a4, 0x0ac, 0x0c0,
];

/// Whether the model says an access at `offset` (relative to the window) is malformed.
fn malformed(offset: u64, size: usize, write: bool) -> bool {
    let size = size as u64;
    if offset < CONFIG_SPACE_OFFSET {
        let table = if write { WRITABLE } else { READABLE };
        return !(size == 4 && offset & 3 == 0 && table.contains(&offset));
    }
    !(matches!(size, 1 | 2 | 4 | 8) && offset + size <= CONFIG_SPACE_OFFSET + config::SIZE as u64)
}

/// Mostly registers and the config space, sometimes around the window or anywhere.
fn address(input: &mut Bytes) -> u64 {
    match input.below(8) {
        0..=3 => BASE + u64::from(input.below(64)) * 4,
        4 | 5 => BASE + CONFIG_SPACE_OFFSET + u64::from(input.below(0x48)),
        6 => BASE - 16 + u64::from(input.u16()) % (VIRTIO_MMIO_WINDOW + 32),
        _ => input.u64(),
    }
}

fn in_window(addr: u64, size: usize) -> Option<u64> {
    let offset = addr.checked_sub(BASE)?;
    (size > 0 && offset.checked_add(size as u64)? <= VIRTIO_MMIO_WINDOW).then_some(offset)
}

fn read32(bus: &Bus, reg: u64) -> u32 {
    let mut data = [0u8; 4];
    assert!(bus.read(BASE + reg, &mut data));
    u32::from_le_bytes(data)
}

fn write32(bus: &Bus, reg: u64, value: u32) {
    assert!(bus.write(BASE + reg, &value.to_le_bytes()));
}

fuzz_target!(|data: &[u8]| {
    let irq = EventFdTrigger::new().expect("interrupt eventfd");
    let irq_watch = irq.try_clone_event_fd().expect("interrupt eventfd clone");
    let dev = ProfilerDevice::new(
        ProfilerDeviceConfig {
            shm_guest_base: 0x1_0000_0000,
            shm_len: 0x10_0000,
            vcpu_count: 2,
            default_period_ns: 50_000_000,
            host_region_id: 7,
            abi_version: (1, 0),
        },
        irq,
    );
    let control = dev.control();
    let metrics = dev.metrics();
    let dev = Arc::new(Mutex::new(dev));
    let mut bus = Bus::new();
    bus.insert(BASE, VIRTIO_MMIO_WINDOW, dev.clone())
        .expect("insert the profiler device");

    let mut input = Bytes::new(data);
    let mut bad = 0u64;
    let mut generation = 0u32;
    let mut counters = [0u64; 7];
    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        // Guest accesses through the bus: the bus lock is taken and released per access.
        match input.u8() % 8 {
            0 | 1 => {
                let addr = address(&mut input);
                let size = usize::from(input.below(9));
                let mut buf = [0xa5u8; 8];
                let buf = &mut buf[..size];
                let hit = bus.read(addr, buf);
                let offset = in_window(addr, size);
                assert_eq!(hit, offset.is_some(), "read {addr:#x} size {size}");
                if let Some(offset) = offset {
                    if malformed(offset, size, false) {
                        bad += 1;
                        assert!(buf.iter().all(|&b| b == 0), "malformed read {buf:?}");
                    }
                }
            }
            2 | 3 => {
                let addr = address(&mut input);
                let size = usize::from(input.below(9));
                let bytes = input.take(size);
                let hit = bus.write(addr, bytes);
                let offset = in_window(addr, bytes.len());
                assert_eq!(hit, offset.is_some(), "write {addr:#x} {bytes:?}");
                if let Some(offset) = offset {
                    bad += u64::from(malformed(offset, bytes.len(), true));
                }
            }
            4 => {
                let b = input.u8();
                let steps = [
                    0,
                    st::ACKNOWLEDGE,
                    st::ACKNOWLEDGE | st::DRIVER,
                    st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
                    st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK,
                ];
                let value = if b < 0x80 {
                    steps[usize::from(b) % steps.len()]
                } else {
                    b
                };
                write32(&bus, regs::STATUS, u32::from(value));
            }
            5 => {
                write32(&bus, regs::DRIVER_FEATURES_SEL, u32::from(input.below(4)));
                write32(&bus, regs::DRIVER_FEATURES, input.u32());
            }
            6 => {
                let value = input.u64().to_le_bytes();
                let at = BASE + CONFIG_SPACE_OFFSET + config::REQUESTED_PERIOD_NS as u64;
                match input.below(3) {
                    0 => assert!(bus.write(at, &value)),
                    1 => {
                        assert!(bus.write(at, &value[..4]));
                        assert!(bus.write(at + 4, &value[4..]));
                    }
                    _ => {
                        for (i, b) in value.iter().enumerate() {
                            assert!(bus.write(at + i as u64, &[*b]));
                        }
                    }
                }
            }
            _ => match input.below(4) {
                0 => {
                    let ns = input.u64();
                    dev.lock().expect("device lock").update_default_period(ns);
                }
                1 => {
                    let active = input.u8() & 1 != 0;
                    dev.lock().expect("device lock").set_sampler_active(active);
                }
                2 => dev.lock().expect("device lock").set_needs_reset(),
                _ => write32(&bus, regs::INTERRUPT_ACK, input.u32()),
            },
        }

        assert_eq!(
            metrics.bad_accesses(),
            bad,
            "bad_accesses disagrees with the model"
        );
        assert_eq!(read32(&bus, regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(read32(&bus, regs::VERSION), MMIO_VERSION);
        assert_eq!(read32(&bus, regs::DEVICE_ID), PROFILER_DEVICE_ID);
        assert_eq!(read32(&bus, regs::VENDOR_ID), PROFILER_VENDOR_ID);
        assert_eq!(read32(&bus, regs::QUEUE_NUM_MAX), 0);
        let status = read32(&bus, regs::STATUS);
        let s = u8::try_from(status).expect("status fits in a byte");
        assert_eq!(
            s & !(st::DRIVER_BITS | st::DEVICE_NEEDS_RESET),
            0,
            "status {s:#x}"
        );
        for (bit, needs) in [
            (st::DRIVER, st::ACKNOWLEDGE),
            (st::FEATURES_OK, st::DRIVER),
            (st::DRIVER_OK, st::FEATURES_OK),
        ] {
            assert!(s & bit == 0 || s & needs != 0, "status {s:#x}");
        }
        {
            let dev = dev.lock().expect("device lock");
            match dev.negotiated_features() {
                Some(features) => {
                    assert_ne!(s & st::FEATURES_OK, 0);
                    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
                    assert_eq!(features & !OFFERED, 0, "features {features:#x}");
                }
                None => assert_eq!(s & st::FEATURES_OK, 0),
            }
            assert_eq!(control.status(), s);
            assert_eq!(dev.driver_ok(), control.driver_ok());
            assert_eq!(dev.requested_period_ns(), control.requested_period_ns());
            let space = dev.config_space();
            assert_eq!(
                space.requested_period_ns,
                control.requested_period_ns().unwrap_or(0)
            );
            assert_eq!(space.default_period_ns, control.default_period_ns());
        }
        if let Some(ns) = control.requested_period_ns() {
            assert!((MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&ns), "period {ns}");
        }
        assert_eq!(
            read32(&bus, regs::INTERRUPT_STATUS) & !INTERRUPT_CONFIG_CHANGE,
            0
        );
        let g = read32(&bus, regs::CONFIG_GENERATION);
        assert!(g >= generation, "generation went down: {generation} -> {g}");
        generation = g;
        let now = [
            metrics.bad_accesses(),
            metrics.protocol_errors(),
            metrics.features_refused(),
            metrics.config_changes(),
            metrics.config_interrupts(),
            metrics.irq_errors(),
            metrics.resets(),
        ];
        assert!(
            now.iter().zip(counters.iter()).all(|(n, c)| n >= c),
            "counters went down: {counters:?} -> {now:?}"
        );
        counters = now;
    }
    assert_eq!(metrics.irq_errors(), 0);
    let signalled = irq_watch.read().unwrap_or(0);
    assert_eq!(signalled, metrics.config_interrupts());
});
