//! Host input (stdin) into the UART's receive FIFO, driven by the VMM's
//! `event_manager::EventManager`.
//!
//! [`SerialInput`] watches two fds, both level-triggered:
//! * the input fd: when readable, it reads at most the FIFO's free space and
//!   enqueues it, so a byte is only taken from the host once the guest has room
//!   for it;
//! * a wakeup eventfd owned by the [`SerialDevice`].
//!
//! # Backpressure
//!
//! When the FIFO is full the subscriber removes the input fd from the epoll
//! set (otherwise level-triggered readiness would spin the loop) and marks the
//! device's input as paused. Unread bytes stay in the host's pipe or tty
//! buffer, so nothing is lost. When the guest's RBR read empties the FIFO,
//! vm-superio calls the `in_buffer_empty` hook, which signals the wakeup
//! eventfd; the subscriber then re-adds the input fd. Both the pause and the
//! hook run under the device mutex, so no wakeup can be missed.
//!
//! # Never blocking the event loop
//!
//! The input fd is not switched to `O_NONBLOCK`: that flag lives on the open
//! file description, which for stdin is shared with the parent shell. Instead
//! exactly one `read(2)` is issued per readiness report; a readable pipe or tty
//! returns at once. Reads go straight to the fd (not through `std::io::Stdin`,
//! whose internal buffer would hide data from epoll).
//!
//! # End of input
//!
//! On end of file, a hang-up with no data left, or a read error, both fds are
//! removed from the event loop and the state becomes [`InputState::Closed`]:
//! the loop keeps running without polling a dead fd. An fd epoll cannot watch
//! (a regular file) also ends up `Closed` at registration.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::{SerialDevice, SerialError};

/// Largest read: the 16550A receive FIFO size.
const READ_CHUNK: usize = 64;

/// Where a [`SerialInput`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputState {
    /// Not registered with an event loop yet.
    Idle,
    /// Watching the input fd.
    Active,
    /// The FIFO is full: input is not polled until the guest drains it.
    Paused,
    /// Input ended (EOF, hang-up, error) or cannot be watched; not polled.
    Closed,
}

/// Feeds an input fd into a [`SerialDevice`]'s receive FIFO; register it with
/// the VMM's event manager. See the module docs for the protocol.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: Box<dyn AsRawFd + Send>,
    wakeup: EventFd,
    state: InputState,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput")
            .field("input_fd", &self.input.as_raw_fd())
            .field("wakeup", &self.wakeup)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl SerialInput {
    /// Creates a subscriber moving bytes from `input` into `serial`.
    ///
    /// `input` must not be read by anyone else (in particular not through a
    /// buffered reader).
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        input: Box<dyn AsRawFd + Send>,
    ) -> Result<Self, SerialError> {
        let wakeup = lock(&serial).clone_wakeup_evt()?;
        Ok(Self {
            serial,
            input,
            wakeup,
            state: InputState::Idle,
        })
    }

    /// A subscriber reading the process's stdin.
    pub fn stdin(serial: Arc<Mutex<SerialDevice>>) -> Result<Self, SerialError> {
        Self::new(serial, Box::new(io::stdin()))
    }

    /// Where the subscriber stands.
    pub fn state(&self) -> InputState {
        self.state
    }

    fn input_fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    fn input_events(&self) -> Events {
        Events::new_raw(self.input_fd(), EventSet::IN)
    }

    fn on_wakeup(&mut self, ops: &mut EventOps) {
        // Reset the counter; `WouldBlock` only means a spurious wakeup.
        let _ = self.wakeup.read();
        if self.state == InputState::Paused {
            match ops.add(self.input_events()) {
                Ok(()) => self.state = InputState::Active,
                Err(_) => self.close(ops),
            }
        }
    }

    fn on_input(&mut self, event_set: EventSet, ops: &mut EventOps) {
        if self.state != InputState::Active {
            // Not expected: we only get here while registered. Make sure the
            // fd cannot keep firing.
            let _ = ops.remove(self.input_events());
            return;
        }
        let serial = Arc::clone(&self.serial);
        let mut device = lock(&serial);
        let capacity = device.fifo_capacity().min(READ_CHUNK);
        if capacity == 0 {
            self.pause(&device, ops);
            return;
        }
        if !event_set.contains(EventSet::IN) {
            // Hang-up or error with nothing left to read.
            self.close(ops);
            return;
        }
        let mut buf = [0u8; READ_CHUNK];
        match read_fd(self.input_fd(), &mut buf[..capacity]) {
            Ok(0) => self.close(ops),
            Ok(n) => {
                device.enqueue_input(&buf[..n]);
                if device.fifo_capacity() == 0 {
                    self.pause(&device, ops);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => self.close(ops),
        }
    }

    /// Stops polling input until the guest empties the FIFO. `device` is the
    /// held guard of `self.serial`, which makes the pause race-free.
    fn pause(&mut self, device: &SerialDevice, ops: &mut EventOps) {
        if ops.remove(self.input_events()).is_err() {
            self.close(ops);
            return;
        }
        device.pause_input();
        self.state = InputState::Paused;
    }

    fn close(&mut self, ops: &mut EventOps) {
        if self.state == InputState::Active {
            let _ = ops.remove(self.input_events());
        }
        let _ = ops.remove(Events::new(&self.wakeup, EventSet::IN));
        self.state = InputState::Closed;
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.wakeup.as_raw_fd() {
            self.on_wakeup(ops);
        } else if fd == self.input_fd() {
            self.on_input(events.event_set(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if ops.add(Events::new(&self.wakeup, EventSet::IN)).is_err() {
            self.state = InputState::Closed;
            return;
        }
        match ops.add(self.input_events()) {
            Ok(()) => self.state = InputState::Active,
            // E.g. EPERM for a regular file, which epoll cannot watch.
            Err(_) => self.close(ops),
        }
    }
}

fn lock(serial: &Mutex<SerialDevice>) -> MutexGuard<'_, SerialDevice> {
    serial.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One `read(2)` on `fd`, bypassing any user-space buffering.
fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the
    // whole call, and `read` writes at most that many bytes into it. `fd` is
    // owned by `self.input`, which outlives the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // A negative return (only -1) signals an error in errno.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
