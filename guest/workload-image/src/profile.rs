//! The guest side of the two-level profiler: each task registers itself in the shared region's
//! task table, names itself in its vCPU's slot whenever it is switched in, and appends a sample
//! after every iteration.
//!
//! The region has one writer by contract; this guest has one task per vCPU running in
//! parallel, so every write happens under a spinlock shared by all vCPUs. An OS-less guest takes
//! no page fault of its own; its samples' `min_flt` is the task's count of first touches of the
//! pages of its region (the demand-zero faults its own OS would take, see `PageTracker`), and
//! `maj_flt` is 0 (there is no backing store). The host side (KVM and vCPU-thread faults,
//! attributed through the vCPU slot) shows what those touches cost the host.
use core::sync::atomic::{AtomicBool, Ordering};

use mirrorball_profiler_abi::{comm_from, Comm, CurrentTask, GuestRegion, GuestSample, RegionMut};
use mirrorball_workload::Params;

static LOCK: AtomicBool = AtomicBool::new(false);

fn locked<R>(f: impl FnOnce() -> R) -> R {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let result = f();
    LOCK.store(false, Ordering::Release);
    result
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc reads the time-stamp counter; user mode may use it (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// One task's handle on the region.
pub struct Profile {
    gpa: u64,
    len: u64,
    tsc_khz: u64,
    vcpu: u32,
    task_id: u32,
    pid: u32,
    comm: Comm,
    /// TSC cycles this task has run (switched in).
    cpu_tsc: u64,
    /// TSC when it was last switched in.
    since_tsc: u64,
}

impl Profile {
    fn region(&self) -> Option<GuestRegion<'static>> {
        let len = usize::try_from(self.len).ok()?;
        // SAFETY: the VMM maps `len` bytes of shared memory at `gpa`, identity-mapped, for the
        // guest's whole life; all accesses go through the ABI crate's atomics.
        let region = unsafe { RegionMut::from_raw(self.gpa as *mut u8, len) }.ok()?;
        GuestRegion::attach(region).ok()
    }

    fn now_ns(&self) -> u64 {
        if self.tsc_khz == 0 {
            return 0;
        }
        u64::try_from(u128::from(rdtsc()) * 1_000_000 / u128::from(self.tsc_khz))
            .unwrap_or(u64::MAX)
    }

    /// Registers task `task` (pid `task + 1`, command `comm`) that runs on `vcpu`.
    pub fn register(params: &Params, task: u32, vcpu: u32, comm: &[u8]) -> Option<Self> {
        if params.profiler_gpa == 0 || params.profiler_len == 0 {
            return None;
        }
        let mut me = Self {
            gpa: params.profiler_gpa,
            len: params.profiler_len,
            tsc_khz: params.tsc_khz,
            vcpu,
            task_id: 0,
            pid: task + 1,
            comm: comm_from(comm),
            cpu_tsc: 0,
            since_tsc: 0,
        };
        let now = me.now_ns();
        locked(|| {
            let region = me.region()?;
            me.task_id = region
                .task_table()
                .register(me.pid, me.pid, &me.comm, now)
                .ok()?;
            Some(())
        })?;
        Some(me)
    }

    /// Starts this task's CPU clock and names the task in its vCPU's slot (a context switch:
    /// like a kernel's, the switch's own work is the incoming task's time).
    pub fn switch_in(&mut self) {
        self.since_tsc = rdtsc();
        let task = CurrentTask {
            task_id: self.task_id,
            pid: self.pid,
            tgid: self.pid,
            flags: 0,
            comm: self.comm,
        };
        let now = self.now_ns();
        locked(|| {
            if let Some(mut slot) = self.region().and_then(|r| r.vcpu_writer(self.vcpu).ok()) {
                slot.switch_to(&task, now);
            }
        });
    }

    /// Adds the time since the last call (or the switch-in) to this task's CPU clock; the
    /// clock runs on until the next switch-in of another task. Called before a sample, and
    /// again after the task's switch announcement returns: the outgoing task's time ends when
    /// its announcement is done, as the host's charge for it does.
    pub fn checkpoint(&mut self) {
        let now = rdtsc();
        self.cpu_tsc = self.cpu_tsc.wrapping_add(now.wrapping_sub(self.since_tsc));
        self.since_tsc = now;
    }

    /// Clears the slot of `vcpu` (nothing runs there any more).
    pub fn idle(&self) {
        locked(|| {
            if let Some(mut slot) = self.region().and_then(|r| r.vcpu_writer(self.vcpu).ok()) {
                slot.clear();
            }
        });
    }

    /// Appends a sample (CPU time and `min_flt` guest minor faults so far; `exited` marks the
    /// last one).
    pub fn sample(&self, exited: bool, min_flt: u64) {
        let now = self.now_ns();
        let cpu_ns = if self.tsc_khz == 0 {
            0
        } else {
            u64::try_from(u128::from(self.cpu_tsc) * 1_000_000 / u128::from(self.tsc_khz))
                .unwrap_or(u64::MAX)
        };
        let sample = GuestSample {
            timestamp_ns: now,
            task_id: self.task_id,
            pid: self.pid,
            min_flt,
            utime_ns: cpu_ns,
            cpu: self.vcpu,
            flags: if exited {
                mirrorball_profiler_abi::SAMPLE_EXITED
            } else {
                0
            },
            ..Default::default()
        };
        locked(|| {
            if let Some(mut ring) = self.region().and_then(|r| r.ring_writer().ok()) {
                ring.push(&sample);
            }
        });
    }

    /// Writes the final sample (`min_flt` guest minor faults in all) and unregisters the task.
    pub fn finish(&self, min_flt: u64) {
        self.sample(true, min_flt);
        let now = self.now_ns();
        locked(|| {
            if let Some(region) = self.region() {
                let _ = region.task_table().unregister(self.task_id, now);
            }
        });
    }
}
