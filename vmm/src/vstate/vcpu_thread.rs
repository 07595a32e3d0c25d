//! What a vCPU thread publishes about itself for the threads that read its counters from
//! outside (the host sampler): its thread id, and a run epoch that tells whether it stayed inside
//! one `KVM_RUN` between two looks.
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// A vCPU thread's published identity and run epoch.
#[derive(Debug, Default)]
pub struct VcpuThread {
    tid: AtomicI32,
    epoch: AtomicU64,
}

impl VcpuThread {
    /// The thread's id, 0 until it has started.
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }

    /// Set by the vCPU thread when it starts.
    pub fn set_tid(&self, tid: i32) {
        self.tid.store(tid, Ordering::Release);
    }

    /// Goes up by one when the thread enters `KVM_RUN` and by one when it returns: odd while it
    /// is inside. The same odd value at two looks means the thread spent the whole time between
    /// them in one `KVM_RUN` call (guest mode and KVM's own exit handling), never in the VMM's
    /// user-space code.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Runs `run` (one `KVM_RUN`) with the epoch odd for its duration.
    pub fn in_kvm_run<T>(&self, run: impl FnOnce() -> T) -> T {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let result = run();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_is_odd_only_inside_a_run() {
        let thread = VcpuThread::default();
        assert_eq!(thread.tid(), 0);
        thread.set_tid(42);
        assert_eq!(thread.tid(), 42);
        let before = thread.epoch();
        let inside = thread.in_kvm_run(|| thread.epoch());
        assert_eq!(before % 2, 0);
        assert_eq!(inside, before + 1);
        assert_eq!(thread.epoch(), before + 2);
    }
}
