//! Behaviour of the UART as the guest and the host see it.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const THR: u64 = 0;
const RBR: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
const MCR: u64 = 4;
const LSR: u64 = 5;

const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_IDLE: u8 = 0x40;
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_THRE: u8 = 0x02;
const MCR_LOOP: u8 = 0x10;

struct Fixture {
    serial: Arc<Mutex<SerialDevice>>,
    out: SharedBuffer,
    irq: EventFd,
}

fn fixture() -> Fixture {
    let trigger = EventFdTrigger::new().unwrap();
    let irq = trigger.try_clone_event_fd().unwrap();
    let out = SharedBuffer::new();
    let serial = SerialDevice::new(trigger, Box::new(out.clone())).unwrap();
    Fixture {
        serial: Arc::new(Mutex::new(serial)),
        out,
        irq,
    }
}

impl Fixture {
    fn read(&self, offset: u64) -> u8 {
        let mut data = [0u8; 1];
        self.serial.lock().unwrap().read(offset, &mut data);
        data[0]
    }

    fn write(&self, offset: u64, value: u8) {
        self.serial.lock().unwrap().write(offset, &[value]);
    }

    /// Reads RBR while LSR says data is ready.
    fn drain(&self) -> Vec<u8> {
        let mut got = Vec::new();
        while self.read(LSR) & LSR_DATA_READY != 0 {
            got.push(self.read(RBR));
        }
        got
    }

    fn irq_count(&self) -> u64 {
        match self.irq.read() {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("irq eventfd read: {e}"),
        }
    }

    fn metrics(&self) -> Arc<SerialMetrics> {
        self.serial.lock().unwrap().metrics()
    }
}

#[test]
fn thr_bytes_reach_the_writer() {
    let f = fixture();
    for b in b"Linux version\r\n" {
        f.write(THR, *b);
    }
    assert_eq!(f.out.contents(), b"Linux version\r\n");
    assert_eq!(f.metrics().out_bytes(), 15);
    f.out.clear();
    assert!(f.out.contents().is_empty());
}

#[test]
fn lsr_reports_thr_empty_and_no_data() {
    let f = fixture();
    let lsr = f.read(LSR);
    assert_eq!(lsr & (LSR_THR_EMPTY | LSR_IDLE), LSR_THR_EMPTY | LSR_IDLE);
    assert_eq!(lsr & LSR_DATA_READY, 0);
    f.write(THR, b'x');
    assert_eq!(f.read(LSR) & LSR_THR_EMPTY, LSR_THR_EMPTY);
}

#[test]
fn enabling_thre_interrupt_fires_the_irq() {
    let f = fixture();
    assert_eq!(f.irq_count(), 0);
    f.write(IER, IER_THRE);
    assert!(f.irq_count() >= 1);
    assert_eq!(f.read(IIR) & 0x0f, IIR_THRE);
    // Each transmitted byte re-raises THRE while it is enabled.
    f.write(THR, b'a');
    assert!(f.irq_count() >= 1);
    // With interrupts disabled, output raises nothing.
    f.write(IER, 0);
    let _ = f.irq_count();
    f.write(THR, b'b');
    assert_eq!(f.irq_count(), 0);
}

#[test]
fn non_byte_accesses_are_ignored() {
    let f = fixture();
    let mut dev = f.serial.lock().unwrap();
    dev.write(THR, b"ab");
    dev.write(THR, &[b'a'; 4]);
    dev.write(8, b"a");
    dev.write(u64::MAX, b"a");
    dev.write(THR, &[]);
    let mut data = [0xaau8; 4];
    dev.read(LSR, &mut data);
    assert_eq!(data, [0; 4]);
    let mut data = [0xaau8; 1];
    dev.read(300, &mut data);
    assert_eq!(data, [0]);
    assert_eq!(dev.metrics().bad_accesses(), 7);
    drop(dev);
    assert!(f.out.contents().is_empty());
}

#[test]
fn enqueued_input_is_readable_and_raises_rda() {
    let f = fixture();
    f.write(IER, IER_RDA);
    let _ = f.irq_count();
    let mut dev = f.serial.lock().unwrap();
    assert_eq!(dev.fifo_capacity(), 64);
    assert_eq!(dev.enqueue_input(&[7u8; 100]), 64);
    assert_eq!(dev.enqueue_input(b"more"), 0);
    assert_eq!(dev.fifo_capacity(), 0);
    drop(dev);
    assert!(f.irq_count() >= 1);
    assert_eq!(f.drain(), vec![7u8; 64]);
    assert_eq!(f.metrics().in_bytes(), 64);
}

#[test]
fn loopback_mode_consumes_but_drops_host_input() {
    let f = fixture();
    f.write(MCR, MCR_LOOP);
    assert_eq!(f.serial.lock().unwrap().enqueue_input(b"abc"), 3);
    assert_eq!(f.metrics().in_dropped_bytes(), 3);
    // The guest's own transmitted byte loops back.
    f.write(THR, b'z');
    assert_eq!(f.drain(), b"z");
}

type Manager = EventManager<Arc<Mutex<SerialInput>>>;

fn input_from_pipe(f: &Fixture) -> (Manager, Arc<Mutex<SerialInput>>, io::PipeWriter) {
    let (reader, writer) = io::pipe().unwrap();
    let input = SerialInput::new(Arc::clone(&f.serial), Box::new(reader)).unwrap();
    assert_eq!(input.state(), InputState::Idle);
    let input = Arc::new(Mutex::new(input));
    let mut manager = Manager::new().unwrap();
    manager.add_subscriber(Arc::clone(&input));
    assert_eq!(input.lock().unwrap().state(), InputState::Active);
    (manager, input, writer)
}

fn state(input: &Arc<Mutex<SerialInput>>) -> InputState {
    input.lock().unwrap().state()
}

#[test]
fn pipe_input_reaches_rbr() {
    let f = fixture();
    f.write(IER, IER_RDA);
    let (mut manager, input, mut writer) = input_from_pipe(&f);
    // Nothing to read yet: the loop times out without dispatching.
    assert_eq!(manager.run_with_timeout(10).unwrap(), 0);
    let _ = f.irq_count();

    writer.write_all(b"root\n").unwrap();
    assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
    assert!(f.irq_count() >= 1);
    assert_eq!(f.drain(), b"root\n");
    assert_eq!(state(&input), InputState::Active);
    assert_eq!(f.metrics().in_bytes(), 5);
}

#[test]
fn full_fifo_pauses_input_without_losing_bytes() {
    let f = fixture();
    let (mut manager, input, mut writer) = input_from_pipe(&f);
    let sent: Vec<u8> = (0..=255u8).cycle().take(300).collect();
    writer.write_all(&sent).unwrap();

    // First batch fills the FIFO and pauses input.
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(state(&input), InputState::Paused);
    assert_eq!(f.serial.lock().unwrap().fifo_capacity(), 0);
    // While paused, pending input does not wake (or spin) the loop.
    assert_eq!(manager.run_with_timeout(10).unwrap(), 0);

    let mut received = Vec::new();
    for _ in 0..100 {
        received.extend(f.drain());
        if received.len() >= sent.len() {
            break;
        }
        manager.run_with_timeout(1000).unwrap();
    }
    assert_eq!(received, sent);
    let metrics = f.metrics();
    assert!(metrics.input_pauses() >= 4, "{}", metrics.input_pauses());
    assert_eq!(metrics.in_bytes(), 300);
    assert_eq!(metrics.in_dropped_bytes(), 0);
}

#[test]
fn eof_unregisters_input() {
    let f = fixture();
    let (mut manager, input, mut writer) = input_from_pipe(&f);
    writer.write_all(b"bye").unwrap();
    drop(writer);
    for _ in 0..10 {
        if state(&input) == InputState::Closed {
            break;
        }
        manager.run_with_timeout(1000).unwrap();
    }
    assert_eq!(state(&input), InputState::Closed);
    // Data written before the hang-up was still delivered.
    assert_eq!(f.drain(), b"bye");
    // The dead fd no longer wakes the loop.
    assert_eq!(manager.run_with_timeout(10).unwrap(), 0);
}

#[test]
fn eof_while_paused_delivers_everything_then_closes() {
    let f = fixture();
    let (mut manager, input, mut writer) = input_from_pipe(&f);
    let sent = vec![b'q'; 100];
    writer.write_all(&sent).unwrap();
    drop(writer);
    let mut received = Vec::new();
    for _ in 0..20 {
        manager.run_with_timeout(100).unwrap();
        received.extend(f.drain());
        if state(&input) == InputState::Closed {
            break;
        }
    }
    assert_eq!(received, sent);
    assert_eq!(state(&input), InputState::Closed);
}

#[test]
fn unpollable_input_is_closed_at_registration() {
    let f = fixture();
    let path = std::env::temp_dir().join(format!("mirrorball-serial-{}", std::process::id()));
    std::fs::write(&path, b"data").unwrap();
    let file = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let input = SerialInput::new(Arc::clone(&f.serial), Box::new(file)).unwrap();
    let input = Arc::new(Mutex::new(input));
    let mut manager = Manager::new().unwrap();
    manager.add_subscriber(Arc::clone(&input));
    assert_eq!(state(&input), InputState::Closed);
    assert_eq!(manager.run_with_timeout(10).unwrap(), 0);
}

#[test]
fn a_restored_uart_keeps_its_writer_and_takes_the_saved_registers_and_fifo() {
    let a = fixture();
    {
        let mut s = a.serial.lock().unwrap();
        s.write(IER, &[IER_RDA]);
        s.enqueue_input(b"hi");
    }
    let state = a.serial.lock().unwrap().state();
    assert_eq!(state.rx_fifo, b"hi");
    let b = fixture();
    let mut s = b.serial.lock().unwrap();
    s.restore(&state).expect("restore");
    assert_eq!(s.state(), state);
    let mut byte = [0u8];
    s.read(RBR, &mut byte);
    assert_eq!(byte[0], b'h');
    s.write(THR, b"x");
    assert_eq!(
        b.out.contents(),
        b"x",
        "output still reaches this UART's writer"
    );
    let mut long = state.clone();
    long.rx_fifo = vec![0; 65];
    assert!(s.restore(&long).is_err());
}
