//! Hostile values: malformed register accesses, and a long random sequence of accesses that must
//! never panic and must keep the device's invariants.

use super::*;

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
        let size = usize::try_from(rng.below(9)).expect("fits");
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
                let step = driver_steps
                    [usize::try_from(rng.below(driver_steps.len() as u64)).expect("fits")];
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
                    wr32(&mut dev, regs::INTERRUPT_ACK, (value & 0xffff_ffff) as u32);
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
