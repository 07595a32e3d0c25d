//! Profiler device and virtio-mmio transport tests: register-level, no KVM.

use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::Bus;
use crate::virtio_mmio::{
    regs, status as st, CONFIG_SPACE_OFFSET, INTERRUPT_CONFIG_CHANGE, MMIO_MAGIC_VALUE,
    MMIO_VERSION, SHM_NONE, VIRTIO_F_VERSION_1,
};

const SHM_BASE: u64 = 0x1_2345_6000;
const SHM_LEN: u64 = 0x40_0000;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const PERIOD_CONTROL: u64 = 1 << PROFILER_F_PERIOD_CONTROL;
const ALL_FEATURES: u64 = VERSION_1 | PERIOD_CONTROL;

fn test_config() -> ProfilerDeviceConfig {
    ProfilerDeviceConfig {
        shm_guest_base: SHM_BASE,
        shm_len: SHM_LEN,
        vcpu_count: 4,
        default_period_ns: DEFAULT_PERIOD_NS,
        host_region_id: 0xfeed_beef_0bad_cafe,
        abi_version: (1, 2),
    }
}

/// A device and a clone of its interrupt eventfd.
fn device_with(config: ProfilerDeviceConfig) -> (ProfilerDevice, EventFd) {
    let irq = EventFdTrigger::new().unwrap();
    let watch = irq.try_clone_event_fd().unwrap();
    (ProfilerDevice::new(config, irq), watch)
}

fn device() -> (ProfilerDevice, EventFd) {
    device_with(test_config())
}

/// How many times the eventfd was signalled since the last call.
fn fired(evt: &EventFd) -> u64 {
    match evt.read() {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

fn rd32(dev: &mut ProfilerDevice, reg: u64) -> u32 {
    let mut data = [0xa5u8; 4];
    dev.read(reg, &mut data);
    u32::from_le_bytes(data)
}

fn wr32(dev: &mut ProfilerDevice, reg: u64, value: u32) {
    dev.write(reg, &value.to_le_bytes());
}

fn rd_cfg(dev: &mut ProfilerDevice, offset: usize, len: usize) -> Vec<u8> {
    let mut data = vec![0xa5u8; len];
    dev.read(CONFIG_SPACE_OFFSET + offset as u64, &mut data);
    data
}

fn rd_cfg_u64(dev: &mut ProfilerDevice, offset: usize) -> u64 {
    u64::from_le_bytes(rd_cfg(dev, offset, 8).try_into().unwrap())
}

fn wr_cfg(dev: &mut ProfilerDevice, offset: usize, data: &[u8]) {
    dev.write(CONFIG_SPACE_OFFSET + offset as u64, data);
}

fn write_driver_features(dev: &mut ProfilerDevice, features: u64) {
    wr32(dev, regs::DRIVER_FEATURES_SEL, 0);
    wr32(dev, regs::DRIVER_FEATURES, features as u32);
    wr32(dev, regs::DRIVER_FEATURES_SEL, 1);
    wr32(dev, regs::DRIVER_FEATURES, (features >> 32) as u32);
}

/// The driver's side of §3.1.1 up to FEATURES_OK; returns the status read
/// back afterwards.
fn negotiate(dev: &mut ProfilerDevice, features: u64) -> u8 {
    wr32(dev, regs::STATUS, 0);
    wr32(dev, regs::STATUS, u32::from(st::ACKNOWLEDGE));
    wr32(dev, regs::STATUS, u32::from(st::ACKNOWLEDGE | st::DRIVER));
    write_driver_features(dev, features);
    wr32(
        dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
    );
    rd32(dev, regs::STATUS) as u8
}

/// Negotiates every offered feature and sets DRIVER_OK.
fn bring_up(dev: &mut ProfilerDevice) {
    let s = negotiate(dev, ALL_FEATURES);
    assert_ne!(s & st::FEATURES_OK, 0);
    wr32(dev, regs::STATUS, u32::from(s | st::DRIVER_OK));
    assert!(dev.driver_ok());
}

fn write_period(dev: &mut ProfilerDevice, ns: u64) {
    wr_cfg(dev, config::REQUESTED_PERIOD_NS, &ns.to_le_bytes());
}

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
fn device_feature_words() {
    let (mut dev, _irq) = device();
    let mut word = |sel| {
        wr32(&mut dev, regs::DEVICE_FEATURES_SEL, sel);
        rd32(&mut dev, regs::DEVICE_FEATURES)
    };
    assert_eq!(word(0), 1 << PROFILER_F_PERIOD_CONTROL);
    assert_eq!(word(1), 1 << (VIRTIO_F_VERSION_1 - 32));
    assert_eq!(word(2), 0);
    assert_eq!(word(u32::MAX), 0);
}

#[test]
fn feature_negotiation_happy_path() {
    let (mut dev, _irq) = device();
    let control = dev.control();
    let s = negotiate(&mut dev, ALL_FEATURES);
    assert_eq!(s, st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK);
    assert_eq!(dev.negotiated_features(), Some(ALL_FEATURES));
    assert!(!dev.driver_ok() && !control.driver_ok());
    wr32(&mut dev, regs::STATUS, u32::from(s | st::DRIVER_OK));
    assert_eq!(rd32(&mut dev, regs::STATUS) as u8, s | st::DRIVER_OK);
    assert!(dev.driver_ok() && control.driver_ok());
    assert_eq!(control.status(), s | st::DRIVER_OK);
    // VERSION_1 alone (no period control) is a valid subset too.
    assert_ne!(negotiate(&mut dev, VERSION_1) & st::FEATURES_OK, 0);
    assert_eq!(dev.negotiated_features(), Some(VERSION_1));
    assert_eq!(dev.metrics().features_refused(), 0);
    assert_eq!(dev.metrics().protocol_errors(), 0);
}

#[test]
fn features_ok_refused_without_version_1_or_with_unoffered_bits() {
    let (mut dev, _irq) = device();
    // No VERSION_1: FEATURES_OK stays clear when read back.
    let s = negotiate(&mut dev, PERIOD_CONTROL);
    assert_eq!(s, st::ACKNOWLEDGE | st::DRIVER);
    assert_eq!(dev.negotiated_features(), None);
    // Nor can the driver go on to DRIVER_OK.
    wr32(
        &mut dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK),
    );
    assert_eq!(
        rd32(&mut dev, regs::STATUS) as u8,
        st::ACKNOWLEDGE | st::DRIVER
    );
    assert!(!dev.driver_ok());
    // A feature that is not offered.
    assert_eq!(
        negotiate(&mut dev, ALL_FEATURES | 1 << 5) & st::FEATURES_OK,
        0
    );
    assert_eq!(
        negotiate(&mut dev, ALL_FEATURES | 1 << 63) & st::FEATURES_OK,
        0
    );
    // A non-zero word beyond bit 63.
    wr32(&mut dev, regs::STATUS, 0);
    wr32(
        &mut dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER),
    );
    write_driver_features(&mut dev, ALL_FEATURES);
    wr32(&mut dev, regs::DRIVER_FEATURES_SEL, 2);
    wr32(&mut dev, regs::DRIVER_FEATURES, 1);
    wr32(
        &mut dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK),
    );
    assert_eq!(rd32(&mut dev, regs::STATUS) as u8 & st::FEATURES_OK, 0);
    // The combined FEATURES_OK | DRIVER_OK write above was a refusal too.
    assert_eq!(dev.metrics().features_refused(), 5);
    // A reset forgets the bad word; a zero word beyond 63 is harmless.
    let s = negotiate(&mut dev, ALL_FEATURES);
    assert_ne!(s & st::FEATURES_OK, 0);
}

#[test]
fn driver_features_are_frozen_after_features_ok() {
    let (mut dev, _irq) = device();
    negotiate(&mut dev, VERSION_1);
    let errors = dev.metrics().protocol_errors();
    write_driver_features(&mut dev, ALL_FEATURES);
    assert_eq!(dev.negotiated_features(), Some(VERSION_1));
    assert_eq!(dev.metrics().protocol_errors(), errors + 2);
}

#[test]
fn status_bits_are_only_added_in_order() {
    let (mut dev, _irq) = device();
    let status = |dev: &mut ProfilerDevice| rd32(dev, regs::STATUS) as u8;
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
    assert_eq!(rd32(&mut dev, regs::SHM_LEN_LOW), SHM_LEN as u32);
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
fn shm_registers() {
    let (mut dev, _irq) = device();
    let region = |dev: &mut ProfilerDevice, shmid| {
        wr32(dev, regs::SHM_SEL, shmid);
        let lo = |dev: &mut ProfilerDevice, r| u64::from(rd32(dev, r));
        (
            lo(dev, regs::SHM_LEN_LOW) | lo(dev, regs::SHM_LEN_HIGH) << 32,
            lo(dev, regs::SHM_BASE_LOW) | lo(dev, regs::SHM_BASE_HIGH) << 32,
        )
    };
    assert_eq!(region(&mut dev, SHMID_GUEST_REGION), (SHM_LEN, SHM_BASE));
    for shmid in [1, 2, 0xff, u32::MAX] {
        assert_eq!(
            region(&mut dev, shmid),
            (SHM_NONE, SHM_NONE),
            "shmid {shmid}"
        );
    }
    assert_eq!(region(&mut dev, 0), (SHM_LEN, SHM_BASE));
    assert_eq!(
        dev.shm_region(),
        Some(ShmRegion {
            base: SHM_BASE,
            len: SHM_LEN
        })
    );
    // An empty or overflowing region is not exposed.
    for (base, len) in [(SHM_BASE, 0), (u64::MAX - 0xfff, 0x2000)] {
        let (mut dev, _irq) = device_with(ProfilerDeviceConfig {
            shm_guest_base: base,
            shm_len: len,
            ..test_config()
        });
        assert_eq!(dev.shm_region(), None);
        assert_eq!(region(&mut dev, 0), (SHM_NONE, SHM_NONE));
    }
}

#[test]
fn config_reads_at_every_width_and_offset() {
    let (mut dev, _irq) = device();
    let expected = ProfilerConfigSpace {
        abi_version_major: 1,
        abi_version_minor: 2,
        vcpu_count: 4,
        default_period_ns: DEFAULT_PERIOD_NS,
        requested_period_ns: 0,
        host_region_id: 0xfeed_beef_0bad_cafe,
        flags: 0,
        reserved: 0,
        min_period_ns: MIN_PERIOD_NS,
        max_period_ns: MAX_PERIOD_NS,
    };
    assert_eq!(dev.config_space(), expected);
    let bytes = expected.to_le_bytes();
    assert_eq!(&bytes[0..2], &[1, 0]);
    assert_eq!(
        &bytes[config::HOST_REGION_ID..][..8],
        &0xfeed_beef_0bad_cafe_u64.to_le_bytes()
    );
    let mut served = 0;
    for width in [1usize, 2, 4, 8] {
        for offset in 0..=config::SIZE - width {
            assert_eq!(
                rd_cfg(&mut dev, offset, width),
                &bytes[offset..offset + width]
            );
            served += 1;
        }
    }
    assert_eq!(dev.metrics().bad_accesses(), 0);
    assert!(served > 150);
    // Past the end (straddling or beyond), and odd widths inside.
    let mut rejected = 0;
    for width in [1usize, 2, 4, 8] {
        for offset in config::SIZE + 1 - width..config::SIZE + 16 {
            assert_eq!(
                rd_cfg(&mut dev, offset, width),
                vec![0; width],
                "{offset}+{width}"
            );
            rejected += 1;
        }
    }
    for width in [0usize, 3, 5, 6, 7] {
        assert_eq!(rd_cfg(&mut dev, 0, width), vec![0; width]);
        rejected += 1;
    }
    assert_eq!(dev.metrics().bad_accesses(), rejected);
}

#[test]
fn requested_period_is_clamped_and_visible_to_the_host() {
    let (mut dev, _irq) = device();
    let control = dev.control();
    bring_up(&mut dev);
    for (written, seen) in [
        (1_000_000, Some(1_000_000)), // 1 kHz
        (1, Some(MIN_PERIOD_NS)),
        (MIN_PERIOD_NS - 1, Some(MIN_PERIOD_NS)),
        (MAX_PERIOD_NS + 1, Some(MAX_PERIOD_NS)),
        (u64::MAX, Some(MAX_PERIOD_NS)),
        (0, None),
        (123_456_789, Some(123_456_789)),
    ] {
        write_period(&mut dev, written);
        assert_eq!(dev.requested_period_ns(), seen, "wrote {written}");
        assert_eq!(control.requested_period_ns(), seen);
        assert_eq!(
            rd_cfg_u64(&mut dev, config::REQUESTED_PERIOD_NS),
            seen.unwrap_or(0)
        );
    }
    // Guest writes do not bump the generation.
    assert_eq!(dev.config_generation(), 0);
    assert_eq!(dev.metrics().protocol_errors(), 0);
}

#[test]
fn requested_period_commits_on_the_last_byte() {
    let (mut dev, _irq) = device();
    let control = dev.control();
    bring_up(&mut dev);
    let changes = control.changes();
    // Linux's virtio_cwrite64: low word, then high word.
    let ns: u64 = 0x0000_0002_540b_e400; // 10 s
    wr_cfg(
        &mut dev,
        config::REQUESTED_PERIOD_NS,
        &(ns as u32).to_le_bytes(),
    );
    assert_eq!(dev.requested_period_ns(), None);
    assert_eq!(control.changes(), changes);
    wr_cfg(
        &mut dev,
        config::REQUESTED_PERIOD_NS + 4,
        &((ns >> 32) as u32).to_le_bytes(),
    );
    assert_eq!(dev.requested_period_ns(), Some(ns));
    assert_eq!(control.changes(), changes + 1);
    // Byte by byte, and 2-byte writes.
    let ns = 7_777_777u64;
    for (i, b) in ns.to_le_bytes().iter().enumerate() {
        wr_cfg(&mut dev, config::REQUESTED_PERIOD_NS + i, &[*b]);
    }
    assert_eq!(dev.requested_period_ns(), Some(ns));
    let ns = 3_000_000u64;
    for i in (0..8).step_by(2) {
        wr_cfg(
            &mut dev,
            config::REQUESTED_PERIOD_NS + i,
            &ns.to_le_bytes()[i..i + 2],
        );
    }
    assert_eq!(dev.requested_period_ns(), Some(ns));
}

#[test]
fn config_writes_are_refused_out_of_state_or_outside_the_field() {
    let (mut dev, _irq) = device();
    // Before FEATURES_OK.
    wr32(
        &mut dev,
        regs::STATUS,
        u32::from(st::ACKNOWLEDGE | st::DRIVER),
    );
    write_period(&mut dev, 1_000_000);
    assert_eq!(dev.requested_period_ns(), None);
    assert_eq!(dev.metrics().protocol_errors(), 1);
    // Without PROFILER_F_PERIOD_CONTROL.
    negotiate(&mut dev, VERSION_1);
    write_period(&mut dev, 1_000_000);
    assert_eq!(dev.requested_period_ns(), None);
    assert_eq!(dev.metrics().protocol_errors(), 2);
    // Read-only fields, or straddling the writable one.
    bring_up(&mut dev);
    let before = dev.config_space();
    for (offset, len) in [
        (config::ABI_VERSION_MAJOR, 2),
        (config::VCPU_COUNT, 4),
        (config::DEFAULT_PERIOD_NS, 8),
        (config::REQUESTED_PERIOD_NS - 4, 8),
        (config::REQUESTED_PERIOD_NS + 4, 8),
        (config::HOST_REGION_ID, 1),
        (config::FLAGS, 4),
        (config::MAX_PERIOD_NS, 8),
    ] {
        wr_cfg(&mut dev, offset, &vec![0x11; len]);
    }
    assert_eq!(dev.config_space(), before);
    assert_eq!(dev.metrics().protocol_errors(), 10);
    // After FAILED.
    let s = dev.status();
    wr32(&mut dev, regs::STATUS, u32::from(s | st::FAILED));
    write_period(&mut dev, 1_000_000);
    assert_eq!(dev.requested_period_ns(), None);
    assert_eq!(dev.metrics().protocol_errors(), 11);
    assert_eq!(dev.metrics().bad_accesses(), 0);
}

#[test]
fn effective_period_follows_driver_ok() {
    let (mut dev, _irq) = device();
    let control = dev.control();
    assert_eq!(control.effective_period_ns(), DEFAULT_PERIOD_NS);
    let s = negotiate(&mut dev, ALL_FEATURES);
    write_period(&mut dev, 1_000_000);
    // Requested, but the driver is not up yet.
    assert_eq!(control.requested_period_ns(), Some(1_000_000));
    assert_eq!(control.effective_period_ns(), DEFAULT_PERIOD_NS);
    wr32(&mut dev, regs::STATUS, u32::from(s | st::DRIVER_OK));
    assert_eq!(control.effective_period_ns(), 1_000_000);
    dev.set_needs_reset();
    assert_eq!(control.effective_period_ns(), DEFAULT_PERIOD_NS);
    dev.update_default_period(20_000_000);
    assert_eq!(control.default_period_ns(), 20_000_000);
    assert_eq!(control.effective_period_ns(), 20_000_000);
}

#[test]
fn host_config_change_bumps_generation_and_interrupts_after_driver_ok() {
    let (mut dev, irq) = device();
    // Before DRIVER_OK: generation only, no interrupt.
    dev.update_default_period(10_000_000);
    assert_eq!(rd32(&mut dev, regs::CONFIG_GENERATION), 1);
    assert_eq!(rd_cfg_u64(&mut dev, config::DEFAULT_PERIOD_NS), 10_000_000);
    assert_eq!(rd32(&mut dev, regs::INTERRUPT_STATUS), 0);
    assert_eq!(fired(&irq), 0);
    // Unchanged: nothing at all.
    dev.update_default_period(10_000_000);
    assert_eq!(rd32(&mut dev, regs::CONFIG_GENERATION), 1);

    bring_up(&mut dev);
    dev.update_default_period(1_000_000);
    assert_eq!(rd32(&mut dev, regs::CONFIG_GENERATION), 2);
    assert_eq!(
        rd32(&mut dev, regs::INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(fired(&irq), 1);
    dev.set_sampler_active(true);
    assert_eq!(rd32(&mut dev, regs::CONFIG_GENERATION), 3);
    assert_eq!(
        rd_cfg(&mut dev, config::FLAGS, 4),
        CONFIG_FLAG_SAMPLER_ACTIVE.to_le_bytes()
    );
    assert_eq!(fired(&irq), 1);
    dev.set_sampler_active(true);
    assert_eq!(fired(&irq), 0);
    assert_eq!(dev.metrics().config_changes(), 3);
    assert_eq!(dev.metrics().config_interrupts(), 2);
    assert_eq!(dev.metrics().irq_errors(), 0);
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
    let s = rd32(&mut dev, regs::STATUS) as u8;
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
fn malformed_register_accesses_are_ignored_and_counted() {
    let (mut dev, _irq) = device();
    let mut bad = 0;
    // Wrong sizes on a register.
    for len in [0usize, 1, 2, 3, 5, 8] {
        let mut data = vec![0xa5u8; len];
        dev.read(regs::MAGIC_VALUE, &mut data);
        assert!(data.iter().all(|&b| b == 0));
        dev.write(regs::STATUS, &vec![1; len]);
        bad += 2;
    }
    // Unaligned, holes, write-only reads, read-only writes.
    for reg in [
        0x001,
        0x002,
        0x018,
        0x028,
        0x0f8,
        regs::DEVICE_FEATURES_SEL,
        regs::SHM_SEL,
    ] {
        assert_eq!(rd32(&mut dev, reg), 0, "{reg:#x}");
        bad += 1;
    }
    for reg in [
        regs::MAGIC_VALUE,
        regs::DEVICE_ID,
        regs::INTERRUPT_STATUS,
        regs::CONFIG_GENERATION,
        0x0f8,
    ] {
        wr32(&mut dev, reg, 0xffff_ffff);
        bad += 1;
    }
    // Past the window and at the top of the offset space.
    for offset in [
        VIRTIO_MMIO_WINDOW,
        VIRTIO_MMIO_WINDOW - 2,
        u64::MAX - 3,
        u64::MAX,
    ] {
        assert_eq!(rd32(&mut dev, offset), 0);
        wr32(&mut dev, offset, 1);
        bad += 2;
    }
    assert_eq!(dev.metrics().bad_accesses(), bad);
    assert_eq!(dev.status(), 0);
    assert_eq!(rd32(&mut dev, regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(rd32(&mut dev, regs::DEVICE_ID), PROFILER_DEVICE_ID);
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
fn control_notifier_fires_on_guest_changes() {
    let (mut dev, _irq) = device();
    let notifier = EventFdTrigger::new().unwrap();
    let watch = notifier.try_clone_event_fd().unwrap();
    dev.set_control_notifier(notifier);
    let control = dev.control();
    bring_up(&mut dev); // reset, ACK, DRIVER, FEATURES_OK, DRIVER_OK
    assert_eq!(fired(&watch), 5);
    write_period(&mut dev, 5_000_000);
    assert_eq!(fired(&watch), 1);
    assert_eq!(control.changes(), 6);
    // Host-side changes are for the driver, not the sampler's notifier.
    dev.update_default_period(1_000_000);
    assert_eq!(fired(&watch), 0);
    assert_eq!(control.notify_errors(), 0);
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
    write(regs::DRIVER_FEATURES, ALL_FEATURES as u32);
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

/// splitmix64: a tiny deterministic generator, so the loop below needs no
/// dependency and replays identically.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Checks what must hold after any sequence of accesses.
fn check_invariants(dev: &mut ProfilerDevice, control: &ProfilerControl) {
    let s = dev.status();
    assert_eq!(
        s & !(st::DRIVER_BITS | st::DEVICE_NEEDS_RESET),
        0,
        "status {s:#x}"
    );
    if s & st::DRIVER_OK != 0 {
        assert_ne!(s & st::FEATURES_OK, 0, "status {s:#x}");
    }
    if s & st::FEATURES_OK != 0 {
        assert_ne!(s & st::DRIVER, 0, "status {s:#x}");
        let negotiated = dev.negotiated_features().unwrap();
        assert_ne!(negotiated & VERSION_1, 0);
        assert_eq!(negotiated & !ALL_FEATURES, 0);
    } else {
        assert_eq!(dev.negotiated_features(), None);
    }
    if s & st::DRIVER != 0 {
        assert_ne!(s & st::ACKNOWLEDGE, 0, "status {s:#x}");
    }
    assert_eq!(control.status(), s);
    if let Some(ns) = control.requested_period_ns() {
        assert!((MIN_PERIOD_NS..=MAX_PERIOD_NS).contains(&ns), "{ns}");
    }
    assert_eq!(dev.interrupt_status() & !INTERRUPT_CONFIG_CHANGE, 0);
    let space = dev.config_space();
    assert_eq!(
        space.requested_period_ns,
        control.requested_period_ns().unwrap_or(0)
    );
    assert_eq!(
        (space.min_period_ns, space.max_period_ns),
        (MIN_PERIOD_NS, MAX_PERIOD_NS)
    );
    assert_eq!(space.reserved, 0);
    assert_eq!(
        dev.shm_region().map(|r| (r.base, r.len)),
        Some((SHM_BASE, SHM_LEN))
    );
}

#[test]
fn random_accesses_never_panic_and_keep_invariants() {
    let (mut dev, irq) = device();
    let control = dev.control();
    let metrics = dev.metrics();
    let mut rng = Rng(0x05ee_d0fd_15c0);
    let mut generation = dev.config_generation();
    let mut counters = [0u64; 7];
    let driver_steps = [
        0,
        st::ACKNOWLEDGE,
        st::ACKNOWLEDGE | st::DRIVER,
        st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
        st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK,
    ];
    for i in 0..50_000 {
        let value = rng.next();
        let size = rng.below(9) as usize;
        // Mostly registers and the config space, sometimes anywhere.
        let offset = match rng.below(10) {
            0..=3 => rng.below(0x40) * 4,
            4..=6 => CONFIG_SPACE_OFFSET + rng.below(config::SIZE as u64 + 8),
            7 => rng.below(VIRTIO_MMIO_WINDOW + 16),
            _ => rng.next(),
        };
        match rng.below(16) {
            0..=5 => {
                let mut data = [0xa5u8; 8];
                dev.read(offset, &mut data[..size]);
            }
            6..=11 => dev.write(offset, &value.to_le_bytes()[..size]),
            // Walk the status machine and negotiate so deeper states are hit.
            12 => {
                let step = driver_steps[rng.below(driver_steps.len() as u64) as usize];
                wr32(&mut dev, regs::STATUS, u32::from(step));
            }
            13 => {
                let features = if rng.below(4) == 0 {
                    value
                } else {
                    ALL_FEATURES
                };
                write_driver_features(&mut dev, features);
            }
            14 => write_period(&mut dev, value >> rng.below(64)),
            _ => match rng.below(4) {
                0 => dev.update_default_period(value),
                1 => dev.set_sampler_active(value & 1 != 0),
                2 => dev.set_needs_reset(),
                _ => {
                    wr32(&mut dev, regs::INTERRUPT_ACK, value as u32);
                }
            },
        }
        check_invariants(&mut dev, &control);
        let g = dev.config_generation();
        assert!(g >= generation, "generation went down at {i}");
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
        assert!(now.iter().zip(&counters).all(|(n, c)| n >= c));
        counters = now;
        // Drain the eventfd now and then so its counter never saturates.
        if i % 1024 == 0 {
            fired(&irq);
        }
    }
    assert_eq!(rd32(&mut dev, regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    // The loop reached every state and path it is meant to exercise.
    assert!(metrics.bad_accesses() > 1000);
    assert!(metrics.protocol_errors() > 100);
    assert!(metrics.features_refused() > 10);
    assert!(metrics.config_interrupts() > 10);
    assert!(metrics.resets() > 100);
    assert_eq!(metrics.irq_errors(), 0);
}
