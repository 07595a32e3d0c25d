//! The configuration space: reads at every width, the guest's requested period (clamping,
//! commit on the last byte, refused writes), the effective period, host-side changes and their
//! interrupt, and the control notifier.

use super::*;

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
        switch_doorbell: 0,
        reserved2: 0,
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
        &((ns & 0xffff_ffff) as u32).to_le_bytes(),
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
