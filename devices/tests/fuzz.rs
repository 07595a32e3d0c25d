//! Hostile-guest test: seeded random port accesses (any offset, size 0..=8,
//! any value) into every device, through the bus and directly, must never
//! panic, and the bus must keep its unmapped-access contract throughout.

use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use mirrorball_devices::bus::{Bus, BusDevice};
use mirrorball_devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use mirrorball_devices::serial::{
    InputState, SerialDevice, SerialInput, SharedBuffer, COM1_PORT_BASE, COM1_PORT_LEN,
};
use mirrorball_devices::EventFdTrigger;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Mostly addresses near the devices, sometimes anywhere.
    fn port(&mut self) -> u64 {
        match self.below(8) {
            0 => self.next(),
            1 => u64::MAX - self.below(16),
            2..=4 => COM1_PORT_BASE - 4 + self.below(COM1_PORT_LEN + 8),
            5..=6 => I8042_PORT_BASE - 4 + self.below(I8042_PORT_LEN + 8),
            _ => self.below(0x1_0000),
        }
    }

    fn bytes(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = (self.next() & 0xff) as u8;
        }
    }
}

struct Devices {
    bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
}

fn devices() -> Devices {
    let serial = SerialDevice::new(
        EventFdTrigger::new().unwrap(),
        Box::new(SharedBuffer::new()),
    )
    .unwrap();
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(I8042::new(EventFdTrigger::new().unwrap())));
    let mut bus = Bus::new();
    bus.insert(COM1_PORT_BASE, COM1_PORT_LEN, serial.clone())
        .unwrap();
    bus.insert(I8042_PORT_BASE, I8042_PORT_LEN, i8042.clone())
        .unwrap();
    Devices { bus, serial, i8042 }
}

fn is_mapped(addr: u64, size: usize) -> bool {
    let covers = |base: u64, len: u64| {
        size > 0 && addr >= base && addr - base < len && addr - base + size as u64 <= len
    };
    covers(COM1_PORT_BASE, COM1_PORT_LEN) || covers(I8042_PORT_BASE, I8042_PORT_LEN)
}

#[test]
fn random_bus_accesses_never_panic() {
    let d = devices();
    let mut rng = Rng(0x5eed_cafe_f00d_d15c);
    let (mut reads, mut writes) = (0u64, 0u64);
    for _ in 0..50_000 {
        let addr = rng.port();
        let size = usize::try_from(rng.below(9)).expect("fits");
        let mut data = [0u8; 8];
        let data = &mut data[..size];
        let mapped = is_mapped(addr, size);
        if rng.below(2) == 0 {
            rng.bytes(data);
            assert_eq!(d.bus.write(addr, data), mapped, "write {addr:#x}/{size}");
            writes += u64::from(!mapped);
        } else {
            assert_eq!(d.bus.read(addr, data), mapped, "read {addr:#x}/{size}");
            if !mapped {
                assert!(data.iter().all(|&b| b == 0xff));
            }
            reads += u64::from(!mapped);
        }
        // Host input arriving at random moments.
        if rng.below(16) == 0 {
            let mut input = [0u8; 16];
            rng.bytes(&mut input);
            let n = usize::try_from(rng.below(17)).expect("fits");
            let taken = d.serial.lock().unwrap().enqueue_input(&input[..n]);
            assert!(taken <= n);
        }
    }
    assert_eq!(d.bus.unmapped_reads(), reads);
    assert_eq!(d.bus.unmapped_writes(), writes);
}

#[test]
fn random_direct_accesses_never_panic() {
    // Devices must cope even with offsets and sizes the bus would never pass.
    let d = devices();
    let mut rng = Rng(0x0dd_ba11);
    for _ in 0..20_000 {
        let offset = match rng.below(3) {
            0 => rng.next(),
            _ => rng.below(16),
        };
        let size = usize::try_from(rng.below(9)).expect("fits");
        let mut data = [0u8; 8];
        rng.bytes(&mut data);
        let data = &mut data[..size];
        let write = rng.below(2) == 0;
        let devs: [&Mutex<dyn BusDevice>; 2] = [&*d.serial, &*d.i8042];
        for dev in devs {
            let mut dev = dev.lock().unwrap();
            if write {
                dev.write(offset, data);
            } else {
                dev.read(offset, data);
            }
        }
    }
}

#[test]
fn random_input_with_random_guest_activity_never_panics() {
    let d = devices();
    let (reader, mut writer) = std::io::pipe().unwrap();
    let input = SerialInput::new(d.serial.clone(), Box::new(reader)).unwrap();
    let input = Arc::new(Mutex::new(input));
    let mut manager = EventManager::<Arc<Mutex<SerialInput>>>::new().unwrap();
    manager.add_subscriber(input.clone());
    let mut rng = Rng(42);
    for round in 0..200 {
        if round < 190 {
            let mut chunk = [0u8; 32];
            rng.bytes(&mut chunk);
            // The pipe holds far more than we ever leave unread here.
            writer
                .write_all(&chunk[..usize::try_from(rng.below(33)).expect("fits")])
                .unwrap();
        }
        for _ in 0..rng.below(40) {
            let addr = COM1_PORT_BASE + rng.below(COM1_PORT_LEN);
            let mut byte = [(rng.next() & 0xff) as u8];
            if rng.below(2) == 0 {
                d.bus.write(addr, &byte);
            } else {
                d.bus.read(addr, &mut byte);
            }
        }
        manager.run_with_timeout(0).unwrap();
    }
    drop(writer);
    // Clear DLAB and loopback mode, then drain so the subscriber reaches EOF.
    d.bus.write(COM1_PORT_BASE + 3, &[0]);
    d.bus.write(COM1_PORT_BASE + 4, &[0]);
    for _ in 0..1000 {
        if input.lock().unwrap().state() == InputState::Closed {
            break;
        }
        let mut lsr = [0u8];
        while d.bus.read(COM1_PORT_BASE + 5, &mut lsr) && lsr[0] & 1 != 0 {
            d.bus.read(COM1_PORT_BASE, &mut [0u8]);
        }
        manager.run_with_timeout(0).unwrap();
    }
    assert_eq!(input.lock().unwrap().state(), InputState::Closed);
}
