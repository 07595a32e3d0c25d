use super::*;
use crate::bus::Bus;
use std::io;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

fn setup() -> (Bus, EventFd) {
    let trigger = EventFdTrigger::new().unwrap();
    let watcher = trigger.try_clone_event_fd().unwrap();
    let mut bus = Bus::new();
    bus.insert(
        I8042_PORT_BASE,
        I8042_PORT_LEN,
        Arc::new(Mutex::new(I8042::new(trigger))),
    )
    .unwrap();
    (bus, watcher)
}

fn fired(evt: &EventFd) -> bool {
    match evt.read() {
        Ok(n) => n > 0,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("reset eventfd read: {e}"),
    }
}

fn inb(bus: &Bus, port: u64) -> u8 {
    let mut b = [0xaa];
    assert!(bus.read(port, &mut b));
    b[0]
}

/// Linux's `i8042_command`: wait for an empty input buffer, send the command (and its data
/// bytes), then read `answers` bytes, each after waiting for OBF. Returns `None` where Linux
/// would time out; the wait is bounded by a few status reads, not Linux's 10,000.
fn command(bus: &Bus, c: u8, data: &[u8], answers: usize) -> Option<Vec<u8>> {
    assert_eq!(inb(bus, 0x64) & 0x02, 0, "input buffer never full");
    bus.write(0x64, &[c]);
    for &d in data {
        bus.write(0x60, &[d]);
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        if inb(bus, 0x64) & status::OBF == 0 {
            return None;
        }
        out.push(inb(bus, 0x60));
    }
    Some(out)
}

#[test]
fn reset_command_fires_the_reset_event() {
    let (bus, reset) = setup();
    assert!(!fired(&reset));
    assert!(bus.write(0x64, &[CMD_RESET_CPU]));
    assert!(fired(&reset));
    // Consumed: no second report without a second command.
    assert!(!fired(&reset));
}

#[test]
fn output_port_write_with_reset_bit_low_resets() {
    let (bus, reset) = setup();
    command(&bus, cmd::WRITE_OUTPUT, &[0x03], 0).unwrap();
    assert!(!fired(&reset));
    assert_eq!(command(&bus, cmd::READ_OUTPUT, &[], 1), Some(vec![0x03]));
    command(&bus, cmd::WRITE_OUTPUT, &[0x02], 0).unwrap();
    assert!(fired(&reset));
}

#[test]
fn other_writes_do_not_reset() {
    let (bus, reset) = setup();
    for value in [0x00, 0x20, 0x60, 0xaa, 0xad, 0xd1, 0xff] {
        bus.write(0x64, &[value]);
        bus.write(0x60, &[0x01]);
    }
    for port in 0x60..=0x63 {
        bus.write(port, &[CMD_RESET_CPU]);
    }
    bus.write(0x64, &[]);
    assert!(!fired(&reset));
    let dev = Arc::new(Mutex::new(I8042::new(EventFdTrigger::new().unwrap())));
    let wide = dev
        .lock()
        .unwrap()
        .reset_evt()
        .try_clone_event_fd()
        .unwrap();
    dev.lock()
        .unwrap()
        .write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
    assert!(!fired(&wide));
}

#[test]
fn idle_status_and_all_ones_elsewhere() {
    let (bus, _reset) = setup();
    let s = inb(&bus, 0x64);
    assert_eq!(
        s & (status::OBF | 0x02),
        0,
        "nothing to read, input buffer empty"
    );
    assert_ne!(s & status::SYSTEM, 0);
    assert_eq!(inb(&bus, 0x61), 0xff);
    let mut wide = [0u8; 2];
    assert!(bus.read(0x60, &mut wide));
    assert_eq!(wide, [0xff; 2]);
}

/// What Linux's i8042 driver does at probe, in order, answered without a single timeout: a
/// stable command byte, self-test, no MUX (the loopback echoes 0xa4), no AUX port (enabling it
/// leaves "AUX disabled" set), and the command byte it writes back sticks.
#[test]
fn linux_probe_sequence_completes_without_timeouts_and_finds_no_aux() {
    let (bus, reset) = setup();
    let ctr = command(&bus, cmd::READ_CTR, &[], 1).unwrap()[0];
    assert_eq!(
        command(&bus, cmd::READ_CTR, &[], 1),
        Some(vec![ctr]),
        "stable CTR"
    );
    assert_eq!(command(&bus, cmd::SELF_TEST, &[], 1), Some(vec![0x55]));
    // MUX detection: 0xf0, 0x56, 0xa4 through the AUX loopback; a MUX would not echo 0xa4.
    for b in [0xf0, 0x56, 0xa4] {
        assert_eq!(command(&bus, cmd::AUX_LOOP, &[b], 1), Some(vec![b]));
    }
    // The loopback answer is AUX data.
    bus.write(0x64, &[cmd::AUX_LOOP]);
    bus.write(0x60, &[0x5a]);
    assert_ne!(inb(&bus, 0x64) & status::AUX_DATA, 0);
    assert_eq!(inb(&bus, 0x60), 0x5a);
    // Bit assignment test.
    command(&bus, cmd::AUX_DISABLE, &[], 0).unwrap();
    let c = command(&bus, cmd::READ_CTR, &[], 1).unwrap()[0];
    assert_ne!(c & CTR_AUX_DISABLED, 0);
    command(&bus, cmd::AUX_ENABLE, &[], 0).unwrap();
    let c = command(&bus, cmd::READ_CTR, &[], 1).unwrap()[0];
    assert_ne!(c & CTR_AUX_DISABLED, 0, "no AUX port: it cannot be enabled");
    // The driver writes its command byte and the keyboard port test passes.
    command(&bus, cmd::WRITE_CTR, &[0x45], 0).unwrap();
    assert_eq!(command(&bus, cmd::READ_CTR, &[], 1), Some(vec![0x45]));
    assert_eq!(command(&bus, cmd::KBD_TEST, &[], 1), Some(vec![0x00]));
    // Keyboard bytes go nowhere: nothing answers.
    bus.write(0x60, &[0xf2]);
    assert_eq!(inb(&bus, 0x64) & status::OBF, 0);
    assert!(!fired(&reset));
}

#[test]
fn answers_beyond_the_buffer_are_dropped() {
    let (bus, _reset) = setup();
    for _ in 0..100 {
        bus.write(0x64, &[cmd::READ_CTR]);
    }
    let mut n = 0;
    while inb(&bus, 0x64) & status::OBF != 0 {
        inb(&bus, 0x60);
        n += 1;
        assert!(n <= 100);
    }
    assert_eq!(n, OUT_CAPACITY);
}

#[test]
fn state_round_trips_and_bad_states_are_refused() {
    let mut a = I8042::new(EventFdTrigger::new().unwrap());
    // Read the configuration byte: one byte waits in the output buffer.
    crate::bus::BusDevice::write(&mut a, 4, &[0x20]);
    let state = a.state();
    assert_eq!(state.out.len(), 1);
    let mut b = I8042::new(EventFdTrigger::new().unwrap());
    b.restore(&state).expect("restore");
    assert_eq!(b.state(), state);
    let mut bad = state.clone();
    bad.pending = 9;
    assert!(b.restore(&bad).is_err());
    bad = state;
    bad.out = vec![(0, false); 17];
    assert!(b.restore(&bad).is_err());
}
