//! Feature negotiation: the offered feature words, FEATURES_OK accepted or refused, and driver
//! features frozen afterwards.

use super::*;

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
    assert_eq!(
        (rd32(&mut dev, regs::STATUS) & 0xff) as u8,
        s | st::DRIVER_OK
    );
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
        (rd32(&mut dev, regs::STATUS) & 0xff) as u8,
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
    assert_eq!(
        (rd32(&mut dev, regs::STATUS) & 0xff) as u8 & st::FEATURES_OK,
        0
    );
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
