//! Watching a UART's output for a line that contains a text (`--snapshot-on`): a writer that
//! sits between the UART and its sink and scans every byte as it is written. The guest controls
//! the bytes, so the scan is bounded and never blocks: it keeps only the last `text.len()` bytes
//! of the current line (a newline starts a new one) and compares them at each byte; once they
//! matched, the newline that ends that line calls the watch's action, once, on the writing
//! (vCPU) thread: the line is whole when the action runs.
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// Longest text a watch looks for.
pub const MAX_WATCH_TEXT: usize = 256;

/// What to do when the text shows up; it must not block (it runs on a vCPU thread).
pub type WatchAction = Box<dyn Fn() + Send + Sync>;

/// A text to look for in a UART's output, armed at most once, firing at most once.
#[derive(Default)]
pub struct SerialWatch {
    armed: OnceLock<(Vec<u8>, WatchAction)>,
    fired: AtomicBool,
}

impl std::fmt::Debug for SerialWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialWatch")
            .field("text", &self.armed.get().map(|(t, _)| t))
            .field("fired", &self.fired())
            .finish()
    }
}

impl SerialWatch {
    /// Looks for `text` (1 to [`MAX_WATCH_TEXT`] bytes, no newline) and runs `action` when a
    /// line contains it. False if the text is not acceptable or the watch is already armed.
    pub fn arm(&self, text: &str, action: WatchAction) -> bool {
        let ok = (1..=MAX_WATCH_TEXT).contains(&text.len()) && !text.contains(['\n', '\r']);
        ok && self.armed.set((text.as_bytes().to_vec(), action)).is_ok()
    }

    /// Whether the text has shown up.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// A writer that passes everything to `inner` and feeds it to a [`SerialWatch`].
pub struct WatchedWriter<W> {
    inner: W,
    watch: Arc<SerialWatch>,
    /// The last bytes of the current line, at most the text's length, and whether the current
    /// line contained the text.
    window: Mutex<(Vec<u8>, bool)>,
}

impl<W: Write> WatchedWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, watch: Arc<SerialWatch>) -> Self {
        Self {
            inner,
            watch,
            window: Mutex::new((Vec::new(), false)),
        }
    }

    fn scan(&self, bytes: &[u8]) {
        let Some((text, action)) = self.watch.armed.get() else {
            return;
        };
        if self.watch.fired() {
            return;
        }
        let mut guard = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let (window, seen) = &mut *guard;
        for &b in bytes {
            if b == b'\n' {
                if *seen {
                    self.watch.fired.store(true, Ordering::Release);
                    action();
                    return;
                }
                window.clear();
                continue;
            }
            if *seen {
                continue;
            }
            if window.len() == text.len() {
                window.remove(0);
            }
            window.push(b);
            *seen = window.as_slice() == text.as_slice();
        }
    }
}

impl<W: Write> Write for WatchedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn watched(text: &str) -> (WatchedWriter<Vec<u8>>, Arc<SerialWatch>, Arc<AtomicUsize>) {
        let watch = Arc::new(SerialWatch::default());
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        assert!(watch.arm(
            text,
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            })
        ));
        (WatchedWriter::new(Vec::new(), watch.clone()), watch, count)
    }

    #[test]
    fn fires_once_on_a_line_containing_the_text_byte_by_byte() {
        let (mut w, watch, count) = watched("Run /init");
        let input = b"[ 1.0] Run /in\nit\n[ 2.0] x Run /init as init process\nRun /init\n";
        // It fires at the newline that ends the line with the text, not before.
        let fire_at = input
            .windows(13)
            .position(|w| w == b"init process\n")
            .expect("in the input")
            + 12;
        for (i, &b) in input.iter().enumerate() {
            w.write_all(&[b]).expect("write");
            assert_eq!(watch.fired(), i >= fire_at, "at byte {i}");
        }
        assert!(watch.fired());
        assert_eq!(count.load(Ordering::SeqCst), 1, "fires once");
        assert!(w.inner.ends_with(b"Run /init\n"), "passes everything on");
    }

    #[test]
    fn a_text_split_by_a_newline_or_a_long_line_does_not_fire_and_bad_texts_are_refused() {
        let (mut w, watch, _) = watched("abc");
        w.write_all(b"ab\nc").expect("write");
        w.write_all(&vec![b'x'; 1 << 16]).expect("write");
        assert!(!watch.fired());
        assert_eq!(w.window.lock().unwrap().0.len(), 3, "bounded");
        let fresh = SerialWatch::default();
        assert!(!fresh.arm("", Box::new(|| {})));
        assert!(!fresh.arm("a\nb", Box::new(|| {})));
        assert!(!fresh.arm(&"x".repeat(MAX_WATCH_TEXT + 1), Box::new(|| {})));
        assert!(fresh.arm("ok", Box::new(|| {})));
        assert!(!fresh.arm("again", Box::new(|| {})), "armed once");
    }
}
