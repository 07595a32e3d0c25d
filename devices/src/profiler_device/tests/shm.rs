//! The shared-memory region registers (SHMSel, SHMLen, SHMBase).

use super::*;

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
