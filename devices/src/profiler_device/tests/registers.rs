//! Register semantics: identity, the status machine, reset, interrupts, the (absent) queues,
//! and access through the MMIO bus.

use super::*;
use std::sync::{Arc, Mutex};

use crate::bus::Bus;

#[test]
fn identity_registers() {
    let (mut dev, _irq) = device();
    assert_eq!(rd32(&mut dev, regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(&MMIO_MAGIC_VALUE.to_le_bytes(), b"virt");
    assert_eq!(rd32(&mut dev, regs::VERSION), MMIO_VERSION);
    assert_eq!(rd32(&mut dev, regs::DEVICE_ID), PROFILER_DEVICE_ID);
    assert_eq!(rd32(&mut dev, regs::VENDOR_ID), PROFILER_VENDOR_ID);
    assert_eq!(&PROFILER_VENDOR_ID.to_le_bytes(), b"MRBL");
    assert_eq!(rd32(&mut dev, regs::STATUS), 0);
    assert_eq!(rd32(&mut dev, regs::INTERRUPT_STATUS), 0);
    assert_eq!(rd32(&mut dev, regs::CONFIG_GENERATION), 0);
    // No queues, whichever is selected.
    for q in [0, 1, 2, 0xffff, u32::MAX] {
        wr32(&mut dev, regs::QUEUE_SEL, q);
        assert_eq!(rd32(&mut dev, regs::QUEUE_NUM_MAX), 0);
        assert_eq!(rd32(&mut dev, regs::QUEUE_READY), 0);
        assert_eq!(rd32(&mut dev, regs::QUEUE_RESET), 0);
    }
    assert_eq!(dev.metrics().bad_accesses(), 0);
    assert_eq!(dev.metrics().protocol_errors(), 0);
}

#[test]
fn status_bits_are_only_added_in_order() {
    let (mut dev, _irq) = device();
    let status = |dev: &mut ProfilerDevice| (rd32(dev, regs::STATUS) & 0xff) as u8;
    // DRIVER without ACKNOWLEDGE.
    wr32(&mut dev, regs::STATUS, u32::from(st::DRIVER));
    assert_eq!(status(&mut dev), 0);
    // ACKNOWLEDGE and DRIVER in one write is fine; DRIVER_OK skipping
    // FEATURES_OK is not (and neither is set).
    wr32(
        &mut dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::DRIVER_OK),
    );
    assert_eq!(status(&mut dev), st::ACKNOWLEDGE | st::DRIVER);
    // Clearing a bit, an undefined bit, a value wider than the status byte.
    wr32(&mut dev, regs::STATUS, u32::from(st::ACKNOWLEDGE));
    wr32(
        &mut dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | 0x10),
    );
    wr32(
        &mut dev,
        regs::STATUS,
        0x100 | u32::from(st::ACKNOWLEDGE | st::DRIVER),
    );
    assert_eq!(status(&mut dev), st::ACKNOWLEDGE | st::DRIVER);
    assert_eq!(dev.metrics().protocol_errors(), 5);
    // FAILED is accepted at any point and freezes the status.
    wr32(
        &mut dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FAILED),
    );
    let failed = st::ACKNOWLEDGE | st::DRIVER | st::FAILED;
    assert_eq!(status(&mut dev), failed);
    write_driver_features(&mut dev, ALL_FEATURES);
    wr32(&mut dev, regs::STATUS, u32::from(failed | st::FEATURES_OK));
    assert_eq!(status(&mut dev), failed);
    assert_eq!(dev.negotiated_features(), None);
    // Writing DEVICE_NEEDS_RESET from the driver side has no effect.
    wr32(&mut dev, regs::STATUS, 0);
    wr32(
        &mut dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DEVICE_NEEDS_RESET),
    );
    assert_eq!(status(&mut dev), st::ACKNOWLEDGE);
}

#[test]
fn reset_clears_everything() {
    let (mut dev, irq) = device();
    let control = dev.control();
    bring_up(&mut dev);
    write_period(&mut dev, 2_000_000);
    assert_eq!(dev.requested_period_ns(), Some(2_000_000));
    dev.update_default_period(10_000_000);
    assert_eq!(dev.interrupt_status(), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(fired(&irq), 1);
    // A half-written period, selectors away from 0.
    wr_cfg(&mut dev, config::REQUESTED_PERIOD_NS, &[0x55; 4]);
    wr32(&mut dev, regs::DEVICE_FEATURES_SEL, 1);
    wr32(&mut dev, regs::SHM_SEL, 7);
    let generation = dev.config_generation();

    wr32(&mut dev, regs::STATUS, 0);
    assert_eq!(rd32(&mut dev, regs::STATUS), 0);
    assert_eq!(dev.negotiated_features(), None);
    assert!(!dev.driver_ok() && !control.driver_ok());
    assert_eq!(control.status(), 0);
    assert_eq!(dev.requested_period_ns(), None);
    assert_eq!(control.requested_period_ns(), None);
    assert_eq!(rd_cfg_u64(&mut dev, config::REQUESTED_PERIOD_NS), 0);
    assert_eq!(rd32(&mut dev, regs::INTERRUPT_STATUS), 0);
    assert_eq!(
        rd32(&mut dev, regs::DEVICE_FEATURES),
        1 << PROFILER_F_PERIOD_CONTROL
    );
    assert_eq!(
        rd32(&mut dev, regs::SHM_LEN_LOW),
        (SHM_LEN & 0xffff_ffff) as u32
    );
    // Host-owned configuration and the generation survive a reset.
    assert_eq!(rd_cfg_u64(&mut dev, config::DEFAULT_PERIOD_NS), 10_000_000);
    assert_eq!(dev.config_generation(), generation);
    assert_eq!(dev.metrics().resets(), 2);
    // The staged half was dropped: the next high-word write commits only itself.
    bring_up(&mut dev);
    wr_cfg(&mut dev, config::REQUESTED_PERIOD_NS + 4, &[0, 0, 0, 0]);
    assert_eq!(dev.requested_period_ns(), None);
    assert_eq!(fired(&irq), 0);
}

#[test]
fn interrupt_ack_clears_only_the_written_bits() {
    let (mut dev, irq) = device();
    bring_up(&mut dev);
    dev.update_default_period(1_000_000);
    assert_eq!(fired(&irq), 1);
    wr32(&mut dev, regs::INTERRUPT_ACK, 0);
    wr32(&mut dev, regs::INTERRUPT_ACK, 1);
    assert_eq!(
        rd32(&mut dev, regs::INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    wr32(&mut dev, regs::INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(rd32(&mut dev, regs::INTERRUPT_STATUS), 0);
    // A new change raises it again.
    dev.update_default_period(2_000_000);
    assert_eq!(
        rd32(&mut dev, regs::INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    wr32(&mut dev, regs::INTERRUPT_ACK, u32::MAX);
    assert_eq!(rd32(&mut dev, regs::INTERRUPT_STATUS), 0);
    assert_eq!(fired(&irq), 1);
}

#[test]
fn needs_reset_notifies_and_takes_the_driver_down() {
    let (mut dev, irq) = device();
    let control = dev.control();
    bring_up(&mut dev);
    dev.set_needs_reset();
    let s = (rd32(&mut dev, regs::STATUS) & 0xff) as u8;
    assert_ne!(s & st::DEVICE_NEEDS_RESET, 0);
    assert!(!dev.driver_ok() && !control.driver_ok());
    assert_eq!(
        rd32(&mut dev, regs::INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(fired(&irq), 1);
    dev.set_needs_reset();
    assert_eq!(fired(&irq), 0);
    // The driver writing back what it read is no error.
    let errors = dev.metrics().protocol_errors();
    wr32(&mut dev, regs::STATUS, u32::from(s));
    assert_eq!(dev.metrics().protocol_errors(), errors);
    assert_eq!(dev.status(), s);
    bring_up(&mut dev);
    assert_eq!(dev.status() & st::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn queue_register_writes_are_protocol_errors() {
    let (mut dev, _irq) = device();
    bring_up(&mut dev);
    let queue_regs = [
        regs::QUEUE_NUM,
        regs::QUEUE_READY,
        regs::QUEUE_NOTIFY,
        regs::QUEUE_DESC_LOW,
        regs::QUEUE_DESC_HIGH,
        regs::QUEUE_DRIVER_LOW,
        regs::QUEUE_DRIVER_HIGH,
        regs::QUEUE_DEVICE_LOW,
        regs::QUEUE_DEVICE_HIGH,
        regs::QUEUE_RESET,
    ];
    for reg in queue_regs {
        wr32(&mut dev, reg, 1);
    }
    assert_eq!(dev.metrics().protocol_errors(), queue_regs.len() as u64);
    assert_eq!(rd32(&mut dev, regs::QUEUE_READY), 0);
    assert_eq!(dev.metrics().bad_accesses(), 0);
    assert!(dev.driver_ok());
}

#[test]
fn served_through_the_mmio_bus() {
    const BASE: u64 = 0xd000_0000;
    let (dev, irq) = device();
    let dev = Arc::new(Mutex::new(dev));
    let control = dev.lock().unwrap().control();
    let mut bus = Bus::new();
    bus.insert(BASE, VIRTIO_MMIO_WINDOW, dev.clone()).unwrap();
    let read = |reg: u64| {
        let mut data = [0u8; 4];
        assert!(bus.read(BASE + reg, &mut data));
        u32::from_le_bytes(data)
    };
    assert_eq!(read(regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(read(regs::DEVICE_ID), PROFILER_DEVICE_ID);
    let write = |reg: u64, v: u32| assert!(bus.write(BASE + reg, &v.to_le_bytes()));
    write(regs::STATUS, u32::from(st::ACKNOWLEDGE | st::DRIVER));
    write(regs::DRIVER_FEATURES_SEL, 0);
    write(regs::DRIVER_FEATURES, (ALL_FEATURES & 0xffff_ffff) as u32);
    write(regs::DRIVER_FEATURES_SEL, 1);
    write(regs::DRIVER_FEATURES, (ALL_FEATURES >> 32) as u32);
    write(
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
    );
    assert!(bus.write(
        BASE + CONFIG_SPACE_OFFSET + config::REQUESTED_PERIOD_NS as u64,
        &1_000_000u64.to_le_bytes()
    ));
    write(
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK),
    );
    assert!(control.driver_ok());
    assert_eq!(control.effective_period_ns(), 1_000_000);
    dev.lock().unwrap().update_default_period(1);
    assert_eq!(read(regs::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(fired(&irq), 1);
    // The last byte of the window is mapped; the byte after is not.
    assert!(bus.read(BASE + VIRTIO_MMIO_WINDOW - 1, &mut [0u8; 1]));
    assert!(!bus.read(BASE + VIRTIO_MMIO_WINDOW, &mut [0u8; 1]));
}
