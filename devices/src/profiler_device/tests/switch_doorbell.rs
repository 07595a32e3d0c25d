//! The task-switch doorbell: offered only while the host wants announcements, delivered to the
//! sink with the vCPU index, refused (and counted as a protocol error) otherwise.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use super::*;

const SWITCH_DOORBELL: u64 = 1 << PROFILER_F_SWITCH_DOORBELL;

#[derive(Default)]
struct Recorder {
    off: AtomicBool,
    seen: Mutex<Vec<usize>>,
}

impl TaskSwitchSink for Recorder {
    fn task_switch(&self, vcpu: usize) {
        self.seen.lock().unwrap().push(vcpu);
    }

    fn wanted(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }
}

fn offered(dev: &mut ProfilerDevice) -> u32 {
    wr32(dev, regs::DEVICE_FEATURES_SEL, 0);
    rd32(dev, regs::DEVICE_FEATURES)
}

#[test]
fn the_doorbell_is_offered_only_while_a_sink_wants_it() {
    let (mut dev, _irq) = device();
    assert_eq!(offered(&mut dev) & (1 << PROFILER_F_SWITCH_DOORBELL), 0);
    let sink = Arc::new(Recorder::default());
    dev.control().set_switch_sink(sink.clone());
    assert_ne!(offered(&mut dev) & (1 << PROFILER_F_SWITCH_DOORBELL), 0);
    sink.off.store(true, Ordering::Relaxed);
    assert_eq!(offered(&mut dev) & (1 << PROFILER_F_SWITCH_DOORBELL), 0);
}

#[test]
fn rings_reach_the_sink_with_their_vcpu_and_are_counted() {
    let (mut dev, _irq) = device();
    let control = dev.control();
    let sink = Arc::new(Recorder::default());
    control.set_switch_sink(sink.clone());
    let s = negotiate(&mut dev, ALL_FEATURES | SWITCH_DOORBELL);
    assert_ne!(s & st::FEATURES_OK, 0);
    wr32(&mut dev, regs::STATUS, u32::from(s | st::DRIVER_OK));
    for vcpu in [0u32, 3, 1] {
        wr_cfg(&mut dev, config::SWITCH_DOORBELL, &vcpu.to_le_bytes());
    }
    assert_eq!(*sink.seen.lock().unwrap(), vec![0, 3, 1]);
    assert_eq!(control.switch_doorbells(), 3);
    assert_eq!(dev.metrics().bad_accesses(), 0);
    // It reads 0 whatever was written.
    assert_eq!(rd_cfg(&mut dev, config::SWITCH_DOORBELL, 4), vec![0; 4]);
}

#[test]
fn bad_rings_are_refused() {
    let (mut dev, _irq) = device();
    let control = dev.control();
    let sink = Arc::new(Recorder::default());
    control.set_switch_sink(sink.clone());
    // Not negotiated: refused.
    bring_up(&mut dev);
    wr_cfg(&mut dev, config::SWITCH_DOORBELL, &0u32.to_le_bytes());
    let s = negotiate(&mut dev, ALL_FEATURES | SWITCH_DOORBELL);
    wr32(&mut dev, regs::STATUS, u32::from(s | st::DRIVER_OK));
    // No such vCPU (the device has 4), other widths, a neighbouring offset.
    wr_cfg(&mut dev, config::SWITCH_DOORBELL, &4u32.to_le_bytes());
    wr_cfg(&mut dev, config::SWITCH_DOORBELL, &u32::MAX.to_le_bytes());
    wr_cfg(&mut dev, config::SWITCH_DOORBELL, &[0u8; 2]);
    wr_cfg(&mut dev, config::SWITCH_DOORBELL, &0u64.to_le_bytes());
    wr_cfg(&mut dev, config::RESERVED2, &0u32.to_le_bytes());
    assert!(sink.seen.lock().unwrap().is_empty());
    assert_eq!(control.switch_doorbells(), 0);
    assert_eq!(dev.metrics().protocol_errors(), 6);
}
