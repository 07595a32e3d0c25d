//! The `EventFd`-backed [`vm_superio::Trigger`] shared by the legacy devices.
//!
//! This module owns [`EventFdTrigger`]. A device signals it by adding 1 to the
//! eventfd counter; whoever holds a clone of the same eventfd consumes it. For
//! the serial port that is KVM (the VMM registers a clone as the irqfd of the
//! UART's GSI); for the i8042 it is the VMM's event loop, which ends the VM on
//! a CPU reset request.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A [`vm_superio::Trigger`] that writes 1 to an [`EventFd`].
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Creates a trigger over a new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        EventFd::new(EFD_NONBLOCK).map(Self)
    }

    /// Wraps an existing eventfd.
    pub fn from_event_fd(evt: EventFd) -> Self {
        Self(evt)
    }

    /// Another trigger signalling the same eventfd (a `dup` of its fd).
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// A clone of the underlying eventfd, e.g. to register as an irqfd or to
    /// watch from an event loop.
    pub fn try_clone_event_fd(&self) -> io::Result<EventFd> {
        self.0.try_clone()
    }

    /// The underlying eventfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl AsRawFd for EventFdTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_superio::Trigger;

    #[test]
    fn trigger_signals_every_clone() {
        let trigger = EventFdTrigger::new().unwrap();
        let clone = trigger.try_clone().unwrap();
        let watcher = trigger.try_clone_event_fd().unwrap();
        // Nothing pending yet: the non-blocking read fails with EAGAIN.
        assert_eq!(
            watcher.read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        trigger.trigger().unwrap();
        clone.trigger().unwrap();
        assert_eq!(watcher.read().unwrap(), 2);
        assert_ne!(trigger.as_raw_fd(), clone.as_raw_fd());
    }
}
