//! Profiler device and virtio-mmio transport tests: register-level, no KVM. This module holds
//! the helpers every topic shares (a device, register and config-space accessors, the driver's
//! negotiation steps); the tests are in one file per topic.

mod config_space;
mod features;
mod hostile;
mod registers;
mod shm;
mod switch_doorbell;

use std::io;

use vmm_sys_util::eventfd::EventFd;

use super::*;
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
    wr32(dev, regs::DRIVER_FEATURES, (features & 0xffff_ffff) as u32);
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
    (rd32(dev, regs::STATUS) & 0xff) as u8
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
