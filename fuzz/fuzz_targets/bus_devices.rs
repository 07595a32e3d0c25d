//! The port-I/O bus as a hostile guest sees it: COM1 (16550 UART) and the i8042 behind a `Bus`,
//! hit with any sequence of reads and writes (any port near or far from them, any size 0..=8,
//! any data) interleaved with host console input.
//!
//! Input: a sequence of operations, each starting with an opcode byte:
//! * `op % 4 == 0`: read  — address selector, size, (no data)
//! * `op % 4 == 1 | 3`: write — address selector, size, `size` data bytes
//! * `op % 4 == 2`: console input — a length byte (0..=63), then that many bytes
//!
//! Checked on every operation: nothing panics; an access is dispatched (returns `true`) exactly
//! when one device covers all of it; an unmapped read returns all ones; the unmapped counters
//! count exactly the unmapped accesses; `enqueue_input` never takes more than fits; the UART's
//! counters never go down.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use mirrorball_devices::bus::Bus;
use mirrorball_devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use mirrorball_devices::serial::{SerialDevice, SerialMetrics, COM1_PORT_BASE, COM1_PORT_LEN};
use mirrorball_devices::EventFdTrigger;
use mirrorball_fuzz::Bytes;

/// The ranges the bus maps, for the "is this access mapped" oracle.
const RANGES: [(u64, u64); 2] = [
    (COM1_PORT_BASE, COM1_PORT_LEN),
    (I8042_PORT_BASE, I8042_PORT_LEN),
];

fn covered(addr: u64, size: usize) -> bool {
    size > 0
        && RANGES.iter().any(|&(base, len)| {
            addr >= base
                && (addr - base)
                    .checked_add(size as u64)
                    .is_some_and(|e| e <= len)
        })
}

/// Mostly ports in and around the two devices, sometimes anywhere in the 64-bit space.
fn address(input: &mut Bytes) -> u64 {
    match input.below(8) {
        0..=2 => COM1_PORT_BASE - 4 + u64::from(input.below((COM1_PORT_LEN + 8) as u8)),
        3..=4 => I8042_PORT_BASE - 4 + u64::from(input.below((I8042_PORT_LEN + 8) as u8)),
        5 => u64::from(input.u16()),
        6 => u64::MAX - u64::from(input.below(16)),
        _ => input.u64(),
    }
}

fn metrics_snapshot(m: &SerialMetrics) -> [u64; 8] {
    [
        m.out_bytes(),
        m.out_lost_bytes(),
        m.rbr_reads(),
        m.in_bytes(),
        m.in_dropped_bytes(),
        m.input_pauses(),
        m.bad_accesses(),
        m.irq_errors(),
    ]
}

fuzz_target!(|data: &[u8]| {
    let serial = SerialDevice::new(
        EventFdTrigger::new().expect("interrupt eventfd"),
        Box::new(std::io::sink()),
    )
    .expect("serial device");
    let metrics = serial.metrics();
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(I8042::new(
        EventFdTrigger::new().expect("reset eventfd"),
    )));
    let mut bus = Bus::new();
    bus.insert(COM1_PORT_BASE, COM1_PORT_LEN, serial.clone())
        .expect("insert COM1");
    bus.insert(I8042_PORT_BASE, I8042_PORT_LEN, i8042.clone())
        .expect("insert i8042");

    let mut input = Bytes::new(data);
    let (mut unmapped_reads, mut unmapped_writes) = (0u64, 0u64);
    let mut counters = metrics_snapshot(&metrics);
    // A bound on the work one input can ask for, whatever its length.
    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        match input.u8() % 4 {
            0 => {
                let addr = address(&mut input);
                let size = usize::from(input.below(9));
                let mut buf = [0xa5u8; 8];
                let buf = &mut buf[..size];
                let hit = bus.read(addr, buf);
                assert_eq!(hit, covered(addr, size), "read {addr:#x} size {size}");
                if !hit {
                    unmapped_reads += 1;
                    assert!(buf.iter().all(|&b| b == 0xff), "unmapped read {buf:?}");
                }
            }
            2 => {
                let len = usize::from(input.below(64));
                let bytes = input.take(len);
                let mut dev = serial.lock().expect("serial lock");
                let room = dev.fifo_capacity();
                let taken = dev.enqueue_input(bytes);
                assert!(
                    taken <= bytes.len() && taken <= room,
                    "took {taken} of {} with room for {room}",
                    bytes.len()
                );
            }
            _ => {
                let addr = address(&mut input);
                let size = usize::from(input.below(9));
                let bytes = input.take(size);
                let hit = bus.write(addr, bytes);
                assert_eq!(hit, covered(addr, bytes.len()), "write {addr:#x} {bytes:?}");
                if !hit {
                    unmapped_writes += 1;
                }
            }
        }
        assert_eq!(bus.unmapped_reads(), unmapped_reads);
        assert_eq!(bus.unmapped_writes(), unmapped_writes);
        let now = metrics_snapshot(&metrics);
        assert!(
            now.iter().zip(counters.iter()).all(|(n, c)| n >= c),
            "serial counters went down: {counters:?} -> {now:?}"
        );
        counters = now;
    }
    assert_eq!(i8042.lock().expect("i8042 lock").reset_errors(), 0);
});
