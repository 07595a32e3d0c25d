//! The gate the vCPU threads of one launch wait at before their first `KVM_RUN`: every VM of a
//! fleet (or every clone of a snapshot) is built and its threads started and set up first, then
//! one wake-up lets them all go, so no guest takes a CPU from the others' setup and the VMs
//! start at one instant. Opening is one `notify_all`: the launching thread is not preempted by
//! each woken vCPU in turn, as it would be waking them VM by VM.
use std::sync::{Arc, Condvar, Mutex};

/// A one-way gate: closed when made, open for good once [`LaunchGate::open`] is called.
#[derive(Debug, Default)]
pub struct LaunchGate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl LaunchGate {
    /// A closed gate.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Blocks the calling thread until the gate is open.
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Opens the gate and wakes every thread waiting at it.
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }
}

/// Opens its gate when dropped: a launch that returns early (or panics) never leaves the VMs it
/// started waiting.
pub struct OpenOnDrop(pub Arc<LaunchGate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn threads_wait_until_the_gate_opens_then_all_go() {
        let gate = LaunchGate::new();
        let passed = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (gate, passed) = (gate.clone(), passed.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    passed.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            passed.load(Ordering::SeqCst),
            0,
            "nobody passes a closed gate"
        );
        drop(OpenOnDrop(gate.clone()));
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(passed.load(Ordering::SeqCst), 4);
        gate.wait(); // an open gate does not block
    }
}
