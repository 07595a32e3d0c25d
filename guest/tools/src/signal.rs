//! Ctrl-C handling: `SIGINT` and `SIGTERM` set a flag that the tools' loops poll, so `monitor`
//! can print its final counts and `work` can unregister itself before exiting.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // Async-signal-safe: a single atomic store.
    STOP.store(true, Ordering::Relaxed);
}

/// Installs the handler for `SIGINT` and `SIGTERM`.
pub fn install() -> io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `sigaction` is plain data; all-zero is a valid value (empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `action` is a valid sigaction whose handler only performs an atomic store,
        // which is async-signal-safe; the old action is not needed (null).
        let rc = unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True once `SIGINT` or `SIGTERM` arrived (after [`install`]).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Sleeps for `total` in slices of at most 50 ms; returns false early if `stop()` becomes true.
pub fn sleep_unless(total: Duration, stop: &dyn Fn() -> bool) -> bool {
    let end = Instant::now() + total;
    loop {
        if stop() {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_stops_early() {
        let t = Instant::now();
        assert!(!sleep_unless(Duration::from_secs(10), &|| true));
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(sleep_unless(Duration::from_millis(20), &|| false));
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
