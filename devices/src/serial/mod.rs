//! The COM1 16550A UART (I/O ports `0x3f8..=0x3ff`, IRQ 4).
//!
//! This module owns:
//! * [`SerialDevice`]: `vm_superio::Serial` behind the [`BusDevice`] interface,
//!   with its interrupt wired to an [`EventFdTrigger`] (an irqfd for GSI 4).
//! * [`SerialMetrics`]: counters fed by vm-superio's `SerialEvents` callbacks.
//! * [`SharedBuffer`]: a cloneable in-memory writer to capture guest output.
//! * [`SerialInput`] (in `input.rs`): the event-loop subscriber that moves host
//!   input (stdin) into the UART's receive FIFO with backpressure.
//! * [`console`] (in `console.rs`): the bounded, non-blocking output buffer the
//!   VMM puts between the UART and stdout, so a guest never waits on the host.
//!
//! # Access sizes
//!
//! The UART's registers are 8 bits wide and Linux only uses `inb`/`outb` on
//! them. Any access that is not exactly one byte at offset 0..=7 is ignored:
//! writes are dropped, reads return zeros, and [`SerialMetrics::bad_accesses`]
//! counts it. Splitting a wide access into byte accesses was rejected because
//! register reads have side effects (reading RBR pops the FIFO, reading IIR
//! clears the THRE interrupt), so a stray `inw` would silently eat input.
//!
//! # Output flushing
//!
//! vm-superio writes each byte sent to THR with `write_all` followed by
//! `flush`. With `std::io::stdout()` as the writer, every guest byte therefore
//! reaches the terminal at once, which keeps prompts without a trailing newline
//! (`login: `, `# `) visible, at the cost of one `write(2)` per byte. That cost
//! is small next to the port-I/O VM exit the guest already paid for the same
//! byte. The VMM gives the UART a [`ConsoleBuffer`], whose `write` and `flush`
//! only copy into memory: a terminal or pipe that stops reading can never block
//! a vCPU (see `console.rs`).

mod console;
mod input;
pub mod watch;

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vm_superio::serial::{Error as SuperioError, SerialEvents};
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
pub use crate::trigger::EventFdTrigger;
pub use console::{
    buffered_console, ConsoleBuffer, ConsoleCounters, ConsoleDrain, DEFAULT_CONSOLE_BUFFER,
};
pub use input::{InputState, SerialInput};

/// First I/O port of COM1.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// Number of I/O ports a 16550 decodes.
pub const COM1_PORT_LEN: u64 = 8;
/// The legacy IRQ line (and KVM GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// The boxed writer guest output goes to.
pub type SerialWriter = Box<dyn Write + Send>;

/// Errors from setting up the serial port or its input.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Creating the eventfd that resumes paused input failed.
    #[error("cannot create the serial input wakeup eventfd: {0}")]
    CreateWakeup(#[source] io::Error),
    /// Duplicating the wakeup eventfd for the input subscriber failed.
    #[error("cannot clone the serial input wakeup eventfd: {0}")]
    CloneWakeup(#[source] io::Error),
}

/// Counters of what happened on the UART. All are monotonic.
#[derive(Debug, Default)]
pub struct SerialMetrics {
    out_bytes: AtomicU64,
    out_lost_bytes: AtomicU64,
    rbr_reads: AtomicU64,
    in_bytes: AtomicU64,
    in_dropped_bytes: AtomicU64,
    input_pauses: AtomicU64,
    bad_accesses: AtomicU64,
    irq_errors: AtomicU64,
}

impl SerialMetrics {
    /// Bytes the guest wrote to THR that reached the writer.
    pub fn out_bytes(&self) -> u64 {
        self.out_bytes.load(Ordering::Relaxed)
    }
    /// Bytes the guest wrote to THR that the writer failed to take.
    pub fn out_lost_bytes(&self) -> u64 {
        self.out_lost_bytes.load(Ordering::Relaxed)
    }
    /// Guest reads of RBR (including reads of an empty FIFO).
    pub fn rbr_reads(&self) -> u64 {
        self.rbr_reads.load(Ordering::Relaxed)
    }
    /// Host input bytes put in the receive FIFO.
    pub fn in_bytes(&self) -> u64 {
        self.in_bytes.load(Ordering::Relaxed)
    }
    /// Host input bytes dropped because the UART was in loopback mode (a real
    /// UART disconnects its receiver then too).
    pub fn in_dropped_bytes(&self) -> u64 {
        self.in_dropped_bytes.load(Ordering::Relaxed)
    }
    /// Times input polling stopped because the receive FIFO was full.
    pub fn input_pauses(&self) -> u64 {
        self.input_pauses.load(Ordering::Relaxed)
    }
    /// Guest accesses ignored for their size or offset.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses.load(Ordering::Relaxed)
    }
    /// Failures to signal the interrupt eventfd.
    pub fn irq_errors(&self) -> u64 {
        self.irq_errors.load(Ordering::Relaxed)
    }

    fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Lets the guest draining the receive FIFO restart paused host input.
///
/// `paused` is only set by [`SerialInput`] while it holds the device lock, and
/// only cleared by the `in_buffer_empty` hook, which also runs under that lock,
/// so a pause can never miss its wakeup.
#[derive(Debug)]
struct InputWakeup {
    paused: AtomicBool,
    evt: EventFd,
}

/// The `SerialEvents` vm-superio calls back into.
#[derive(Debug)]
struct SerialHooks {
    metrics: Arc<SerialMetrics>,
    wakeup: Arc<InputWakeup>,
}

impl SerialEvents for SerialHooks {
    fn buffer_read(&self) {
        SerialMetrics::bump(&self.metrics.rbr_reads, 1);
    }

    fn out_byte(&self) {
        SerialMetrics::bump(&self.metrics.out_bytes, 1);
    }

    fn tx_lost_byte(&self) {
        SerialMetrics::bump(&self.metrics.out_lost_bytes, 1);
    }

    fn in_buffer_empty(&self) {
        // Called on every RBR read that leaves the FIFO empty; only signal
        // (one syscall) when input is actually waiting on us.
        if self.wakeup.paused.swap(false, Ordering::AcqRel) {
            // A failed write can only mean the counter is saturated, i.e. a
            // wakeup is already pending.
            let _ = self.wakeup.evt.write(1);
        }
    }
}

/// The 16550A UART as a bus device. Insert it at [`COM1_PORT_BASE`] with
/// length [`COM1_PORT_LEN`]; see the module docs for access-size handling.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, SerialHooks, SerialWriter>,
    metrics: Arc<SerialMetrics>,
    wakeup: Arc<InputWakeup>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("interrupt", self.serial.interrupt_evt())
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// Creates the UART. `interrupt` is signalled whenever the UART raises its
    /// interrupt line; guest output is written (and flushed per byte) to `out`.
    pub fn new(interrupt: EventFdTrigger, out: SerialWriter) -> Result<Self, SerialError> {
        let metrics = Arc::new(SerialMetrics::default());
        let wakeup = Arc::new(InputWakeup {
            paused: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK).map_err(SerialError::CreateWakeup)?,
        });
        let hooks = SerialHooks {
            metrics: Arc::clone(&metrics),
            wakeup: Arc::clone(&wakeup),
        };
        Ok(Self {
            serial: Serial::with_events(interrupt, hooks, out),
            metrics,
            wakeup,
        })
    }

    /// The UART's counters, shareable with a metrics reporter.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The trigger signalled when the UART raises its interrupt.
    pub fn interrupt_evt(&self) -> &EventFdTrigger {
        self.serial.interrupt_evt()
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Puts host input in the receive FIFO and raises the data-ready interrupt.
    ///
    /// Returns how many bytes of `bytes` were consumed: at most
    /// [`Self::fifo_capacity`]. In loopback mode the receiver is disconnected
    /// from the line, as on a real UART: the bytes are consumed but dropped
    /// (counted by [`SerialMetrics::in_dropped_bytes`]).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        let fitting = bytes.len().min(self.serial.fifo_capacity());
        let taken = match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(SuperioError::FullFifo) => 0,
            // The bytes are in the FIFO; only the interrupt was lost.
            Err(SuperioError::Trigger(_)) => {
                SerialMetrics::bump(&self.metrics.irq_errors, 1);
                fitting
            }
            Err(SuperioError::IOError(_)) => 0,
        };
        SerialMetrics::bump(&self.metrics.in_bytes, taken as u64);
        if taken < fitting {
            SerialMetrics::bump(&self.metrics.in_dropped_bytes, (fitting - taken) as u64);
            return fitting;
        }
        taken
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> crate::state::SerialState {
        let s = self.serial.state();
        crate::state::SerialState {
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
        }
    }

    /// Loads a saved state into this UART (its interrupt, writer and counters stay its own).
    pub fn restore(
        &mut self,
        state: &crate::state::SerialState,
    ) -> Result<(), crate::state::StateError> {
        let saved = vm_superio::serial::SerialState {
            baud_divisor_low: state.divisor[0],
            baud_divisor_high: state.divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.rx_fifo.clone(),
        };
        // `from_state` needs the parts by value: swap in a placeholder writer while rebuilding.
        let placeholder = Serial::with_events(
            self.serial.interrupt_evt().try_clone().map_err(|e| {
                crate::state::StateError::new("serial", format!("cannot clone its eventfd: {e}"))
            })?,
            SerialHooks {
                metrics: Arc::clone(&self.metrics),
                wakeup: Arc::clone(&self.wakeup),
            },
            Box::new(io::sink()) as SerialWriter,
        );
        let old = std::mem::replace(&mut self.serial, placeholder);
        let trigger = old.interrupt_evt().try_clone().map_err(|e| {
            crate::state::StateError::new("serial", format!("cannot clone its eventfd: {e}"))
        })?;
        let out = old.into_writer();
        let hooks = SerialHooks {
            metrics: Arc::clone(&self.metrics),
            wakeup: Arc::clone(&self.wakeup),
        };
        match Serial::from_state(&saved, trigger, hooks, out) {
            Ok(serial) => {
                self.serial = serial;
                Ok(())
            }
            Err(e) => Err(crate::state::StateError::new(
                "serial",
                format!("refused: {e:?}"),
            )),
        }
    }

    /// Marks host input as paused on a full FIFO; the next guest read that
    /// empties the FIFO signals the wakeup eventfd.
    fn pause_input(&self) {
        SerialMetrics::bump(&self.metrics.input_pauses, 1);
        self.wakeup.paused.store(true, Ordering::Release);
    }

    fn clone_wakeup_evt(&self) -> Result<EventFd, SerialError> {
        self.wakeup
            .evt
            .try_clone()
            .map_err(SerialError::CloneWakeup)
    }

    /// The register index of a valid single-byte access.
    fn register(&self, offset: u64, len: usize) -> Option<u8> {
        let reg = u8::try_from(offset)
            .ok()
            .filter(|&r| len == 1 && u64::from(r) < COM1_PORT_LEN);
        if reg.is_none() {
            SerialMetrics::bump(&self.metrics.bad_accesses, 1);
        }
        reg
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.register(offset, data.len()) {
            Some(reg) => data[0] = self.serial.read(reg),
            None => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = self.register(offset, data.len()) else {
            return;
        };
        match self.serial.write(reg, data[0]) {
            // Lost output is already counted by the `tx_lost_byte` hook.
            Ok(()) | Err(SuperioError::IOError(_)) | Err(SuperioError::FullFifo) => {}
            Err(SuperioError::Trigger(_)) => SerialMetrics::bump(&self.metrics.irq_errors, 1),
        }
    }
}

/// A cloneable in-memory writer: every clone appends to the same buffer.
/// Use it in place of stdout to capture guest output in tests.
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// Creates an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Everything written so far, as (lossy) UTF-8.
    pub fn contents_string(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    /// Empties the buffer.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
