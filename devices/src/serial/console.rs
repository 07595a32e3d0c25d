//! Console output that can never block the guest.
//!
//! This module owns [`buffered_console`]: a pair of a [`ConsoleBuffer`] (the writer the UART gets; it
//! copies bytes into a bounded in-memory buffer and returns at once) and a [`ConsoleDrain`] (a
//! thread that moves the buffer to the real output, e.g. stdout, and may block there). A vCPU
//! that writes THR therefore never waits on a terminal or a pipe nobody reads: when the buffer is
//! full the bytes are dropped and counted ([`ConsoleCounters::dropped_bytes`]).
//!
//! At the end of a VM [`ConsoleDrain::finish`] gives the thread a bounded time to write what is
//! left: it returns once the buffer is empty, or when the output made no progress for the given
//! idle time (the thread is then left behind, blocked, and dies with the process).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default capacity of the console buffer (bytes).
pub const DEFAULT_CONSOLE_BUFFER: usize = 256 * 1024;

/// Counters of a console, shareable with a reporter.
#[derive(Debug, Default)]
pub struct ConsoleCounters {
    written: AtomicU64,
    dropped: AtomicU64,
}

impl ConsoleCounters {
    /// Bytes the drain thread wrote to the output.
    pub fn written_bytes(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Bytes dropped: the buffer was full, or the output failed.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct State {
    buf: VecDeque<u8>,
    /// Bytes the drain thread took from `buf` and has not written yet.
    in_flight: usize,
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
    counters: Arc<ConsoleCounters>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The non-blocking writer side; see the module docs.
#[derive(Debug, Clone)]
pub struct ConsoleBuffer {
    shared: Arc<Shared>,
}

impl Write for ConsoleBuffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let room = self.shared.capacity.saturating_sub(state.buf.len());
        let taken = room.min(bytes.len());
        state.buf.extend(&bytes[..taken]);
        drop(state);
        let lost = bytes.len() - taken;
        if lost > 0 {
            self.shared
                .counters
                .dropped
                .fetch_add(lost as u64, Ordering::Relaxed);
        }
        if taken > 0 {
            self.shared.ready.notify_one();
        }
        // Dropped bytes are reported as written: the UART must not see an error it would retry.
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The drain thread flushes after every batch; flushing here could block.
        Ok(())
    }
}

/// The draining side; see the module docs. Dropping it finishes with a one-second idle limit.
#[derive(Debug)]
pub struct ConsoleDrain {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Creates a console buffer of `capacity` bytes that a new thread drains into `out`.
pub fn buffered_console(
    out: Box<dyn Write + Send>,
    capacity: usize,
) -> io::Result<(ConsoleBuffer, ConsoleDrain)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        ready: Condvar::new(),
        capacity: capacity.max(1),
        counters: Arc::new(ConsoleCounters::default()),
    });
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || drain(&shared, out))?
    };
    Ok((
        ConsoleBuffer {
            shared: Arc::clone(&shared),
        },
        ConsoleDrain {
            shared,
            thread: Some(thread),
        },
    ))
}

fn drain(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::new();
    loop {
        {
            let mut state = shared.lock();
            while state.buf.is_empty() && !state.closed {
                state = shared
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.buf.is_empty() {
                return;
            }
            batch.clear();
            batch.extend(state.buf.drain(..));
            state.in_flight = batch.len();
        }
        // Counted as it goes: what reached `out` is written, the rest of a failed batch dropped.
        let mut done = 0;
        while done < batch.len() {
            match out.write(&batch[done..]) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    shared
                        .counters
                        .written
                        .fetch_add(n as u64, Ordering::Relaxed);
                    shared.lock().in_flight = batch.len() - done;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if done == batch.len() {
            let _ = out.flush();
        }
        let lost = batch.len() - done;
        shared
            .counters
            .dropped
            .fetch_add(lost as u64, Ordering::Relaxed);
        shared.lock().in_flight = 0;
    }
}

impl ConsoleDrain {
    /// The console's counters.
    pub fn counters(&self) -> Arc<ConsoleCounters> {
        Arc::clone(&self.shared.counters)
    }

    /// Bytes waiting in the buffer.
    pub fn pending_bytes(&self) -> usize {
        self.shared.lock().buf.len()
    }

    /// Lets the thread write what is left, for as long as it makes progress (at most `idle`
    /// without any); then returns whether everything was written. Idempotent.
    pub fn finish(&mut self, idle: Duration) -> bool {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let mut last = self.shared.counters.written_bytes();
        let mut last_progress = Instant::now();
        while !thread.is_finished() {
            let now = self.shared.counters.written_bytes();
            if now != last {
                last = now;
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= idle {
                // Left blocked in `write`; the bytes it still holds are lost.
                let pending = {
                    let state = self.shared.lock();
                    (state.buf.len() + state.in_flight) as u64
                };
                self.shared
                    .counters
                    .dropped
                    .fetch_add(pending, Ordering::Relaxed);
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = thread.join();
        true
    }
}

impl Drop for ConsoleDrain {
    fn drop(&mut self) {
        self.finish(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that blocks forever, like a pipe nobody reads.
    struct Stalled(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut go = lock.lock().unwrap_or_else(PoisonError::into_inner);
            while !*go {
                go = cv.wait(go).unwrap_or_else(PoisonError::into_inner);
            }
            Err(io::Error::other("released"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_output_in_order() {
        let out = crate::serial::SharedBuffer::new();
        let (mut tx, mut drain) = buffered_console(Box::new(out.clone()), 1024).expect("console");
        for chunk in [&b"hello "[..], b"world", b"\n"] {
            assert_eq!(tx.write(chunk).expect("write"), chunk.len());
        }
        assert!(drain.finish(Duration::from_secs(5)));
        assert_eq!(out.contents(), b"hello world\n");
        assert_eq!(drain.counters().written_bytes(), 12);
        assert_eq!(drain.counters().dropped_bytes(), 0);
    }

    #[test]
    fn a_stalled_output_never_blocks_the_writer_and_overflow_is_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (mut tx, mut drain) =
            buffered_console(Box::new(Stalled(gate.clone())), 100).expect("console");
        let start = Instant::now();
        // Far more than the buffer holds: the writer must return at once every time.
        for _ in 0..10_000 {
            assert_eq!(tx.write(b"0123456789").expect("write"), 10);
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        let dropped = drain.counters().dropped_bytes();
        // At most the buffer plus one batch in flight was kept.
        assert!(dropped >= 100_000 - 200, "dropped {dropped}");
        let start = Instant::now();
        assert!(!drain.finish(Duration::from_millis(100)));
        assert!(start.elapsed() < Duration::from_secs(2));
        let (lock, cv) = &*gate;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
    }
}
