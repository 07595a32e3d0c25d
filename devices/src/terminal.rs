//! Raw mode for the host terminal the guest console runs on.
//!
//! This module owns [`RawTerminal`], a guard that switches a terminal (stdin
//! in the VMM) to raw mode so every keystroke goes straight to the guest's
//! serial port, and restores the saved settings when dropped. On anything that
//! is not a terminal (a pipe, a file, `/dev/null`) it does nothing.
//!
//! # What "raw" means here
//!
//! * Off: canonical line editing (`ICANON`), echo (`ECHO`, `ECHONL`: the guest
//!   echoes), extended input processing (`IEXTEN`), CR/NL translation on input
//!   (`ICRNL`, `INLCR`, `IGNCR`: the guest's tty maps Enter's CR itself), XON/XOFF
//!   flow control (`IXON`: Ctrl-S/Ctrl-Q reach the guest), break and parity
//!   handling. Reads return as soon as one byte is there (`VMIN` 1, `VTIME` 0).
//! * Kept on: `ISIG`, so Ctrl-C, Ctrl-\ and Ctrl-Z still signal the VMM and a
//!   runaway guest can always be stopped from the keyboard. The price is that
//!   those keys never reach the guest. Also kept: output post-processing
//!   (`OPOST`), so the VMM's own messages still start at column 0.
//!
//! If the VMM dies from a signal the guard's `Drop` does not run; interactive
//! shells restore the terminal of a foreground job killed by a signal, and the
//! VMM can also handle the signal, end its loop and let the guard drop, or call
//! [`RawTerminal::restore`] itself.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Errors from switching the terminal mode.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    /// Reading the terminal settings failed.
    #[error("cannot read the terminal settings: {0}")]
    GetAttr(#[source] io::Error),
    /// Applying terminal settings failed.
    #[error("cannot apply the terminal settings: {0}")]
    SetAttr(#[source] io::Error),
    /// Duplicating the terminal fd failed.
    #[error("cannot duplicate the terminal fd: {0}")]
    Dup(#[source] io::Error),
}

/// Keeps a terminal in raw mode while alive; see the module docs.
#[derive(Debug)]
pub struct RawTerminal {
    /// Our own `dup` of the terminal fd and the settings to restore; `None`
    /// when the fd is not a terminal or was already restored.
    saved: Option<(OwnedFd, libc::termios)>,
}

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal; a no-op guard otherwise.
    pub fn stdin() -> Result<Self, TerminalError> {
        Self::new(io::stdin().as_fd())
    }

    /// Puts `fd` in raw mode if it is a terminal; a no-op guard otherwise.
    /// The guard keeps its own duplicate of `fd`, so it may outlive `fd`.
    pub fn new(fd: BorrowedFd<'_>) -> Result<Self, TerminalError> {
        if !is_terminal(fd) {
            return Ok(Self { saved: None });
        }
        let fd = fd.try_clone_to_owned().map_err(TerminalError::Dup)?;
        let saved = get_attr(fd.as_fd())?;
        let mut raw = saved;
        make_raw(&mut raw);
        set_attr(fd.as_fd(), &raw)?;
        Ok(Self {
            saved: Some((fd, saved)),
        })
    }

    /// Whether this guard switched a terminal to raw mode (and has not
    /// restored it yet).
    pub fn is_raw(&self) -> bool {
        self.saved.is_some()
    }

    /// Restores the saved settings now. Idempotent; `Drop` calls it too.
    pub fn restore(&mut self) -> Result<(), TerminalError> {
        match self.saved.take() {
            Some((fd, saved)) => set_attr(fd.as_fd(), &saved),
            None => Ok(()),
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // Nothing sensible to do on failure while dropping.
        let _ = self.restore();
    }
}

/// Clears the raw-mode bits listed in the module docs, keeping `ISIG` and
/// `OPOST`.
fn make_raw(t: &mut libc::termios) {
    t.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
    t.c_cflag &= !(libc::CSIZE | libc::PARENB);
    t.c_cflag |= libc::CS8;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
}

fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: `isatty` only inspects the open fd, which `fd` keeps valid for
    // the duration of the call.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

fn get_attr(fd: BorrowedFd<'_>) -> Result<libc::termios, TerminalError> {
    let mut t = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: `t` points to writable memory for one `termios`, which
    // `tcgetattr` fills on success; `fd` is open for the call.
    let rc = unsafe { libc::tcgetattr(fd.as_raw_fd(), t.as_mut_ptr()) };
    if rc != 0 {
        return Err(TerminalError::GetAttr(io::Error::last_os_error()));
    }
    // SAFETY: `tcgetattr` returned 0, so it initialised the whole struct.
    Ok(unsafe { t.assume_init() })
}

fn set_attr(fd: BorrowedFd<'_>, t: &libc::termios) -> Result<(), TerminalError> {
    // SAFETY: `t` is a valid `termios` that `tcsetattr` only reads; `fd` is
    // open for the call.
    let rc = unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, t) };
    if rc != 0 {
        return Err(TerminalError::SetAttr(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::os::fd::FromRawFd;

    /// Opens a pseudo-terminal pair; `None` where the sandbox has no ptys.
    fn open_pty() -> Option<(OwnedFd, OwnedFd)> {
        // SAFETY: plain libc calls on fds we own; every returned fd is checked
        // before being wrapped, and `name` is a buffer of the length passed.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            if master < 0 {
                return None;
            }
            let master = OwnedFd::from_raw_fd(master);
            if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
                return None;
            }
            let mut name = [0 as libc::c_char; 128];
            if libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0 {
                return None;
            }
            let path = CStr::from_ptr(name.as_ptr());
            let slave = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            if slave < 0 {
                return None;
            }
            Some((master, OwnedFd::from_raw_fd(slave)))
        }
    }

    fn modes(t: &libc::termios) -> (u32, u32, u32, u32, u8, u8) {
        (
            t.c_iflag,
            t.c_oflag,
            t.c_cflag,
            t.c_lflag,
            t.c_cc[libc::VMIN],
            t.c_cc[libc::VTIME],
        )
    }

    #[test]
    fn raw_mode_is_applied_and_restored_on_a_tty() {
        let Some((_master, slave)) = open_pty() else {
            eprintln!("no pseudo-terminals here; skipping");
            return;
        };
        let before = get_attr(slave.as_fd()).unwrap();
        assert_ne!(before.c_lflag & libc::ICANON, 0);

        let mut guard = RawTerminal::new(slave.as_fd()).unwrap();
        assert!(guard.is_raw());
        let raw = get_attr(slave.as_fd()).unwrap();
        assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO | libc::IEXTEN), 0);
        assert_eq!(raw.c_iflag & (libc::ICRNL | libc::IXON), 0);
        assert_ne!(raw.c_lflag & libc::ISIG, 0, "Ctrl-C must still signal");
        assert_ne!(raw.c_oflag & libc::OPOST, 0);
        assert_eq!(raw.c_cc[libc::VMIN], 1);

        guard.restore().unwrap();
        assert!(!guard.is_raw());
        assert_eq!(modes(&get_attr(slave.as_fd()).unwrap()), modes(&before));

        // Dropping restores too, and the guard outlives the borrowed fd.
        let guard = RawTerminal::new(slave.as_fd()).unwrap();
        assert_eq!(get_attr(slave.as_fd()).unwrap().c_lflag & libc::ICANON, 0);
        drop(guard);
        assert_eq!(modes(&get_attr(slave.as_fd()).unwrap()), modes(&before));
    }

    #[test]
    fn non_tty_is_left_alone() {
        let (reader, _writer) = io::pipe().unwrap();
        let mut guard = RawTerminal::new(reader.as_fd()).unwrap();
        assert!(!guard.is_raw());
        guard.restore().unwrap();
    }
}
