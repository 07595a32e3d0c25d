//! A fair start for VMs let go together when their vCPUs outnumber the host's CPUs.
//!
//! Released at one instant, N vCPU threads on fewer CPUs would enter the guest one CPU's worth
//! at a time, each holding its CPU until the scheduler's next tick preempts it (4 ms at
//! `HZ=250`): the last vCPU of 8 on 2 CPUs first ran about 12–20 ms after the release, its
//! guest not started while the others' ran. With a first slice, each vCPU's first `KVM_RUN` is
//! cut short by a one-shot timer (the vCPU kick signal, directed at its own thread); the thread
//! then yields its CPU once, so every released vCPU runs its guest within about a millisecond.
//! After that the vCPUs share the CPUs as the scheduler decides. Costs one timer and one exit
//! per vCPU, once.
//!
//! The VMs of one launch are let go through one [`StartGate`]: their vCPU threads, spawned as
//! each VM starts, wait at it, and one wake-up releases them all. (Resuming the VMs one by one,
//! the launching thread lost its CPU to the first vCPUs it woke, and the last VM was let go
//! about 2 ms after the first.)
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long a vCPU runs its guest before its first yield.
pub const FIRST_SLICE: Duration = Duration::from_micros(50);

/// Whether `vcpus` vCPUs let go together need a first slice: when they are more than the CPUs
/// this process may run on.
pub fn needed(vcpus: usize) -> bool {
    vcpus > std::thread::available_parallelism().map_or(1, usize::from)
}

/// Gives each of `vcpus` a first slice.
pub fn give(vcpus: &mut [super::vcpu::Vcpu]) {
    for vcpu in vcpus {
        vcpu.set_first_slice(FIRST_SLICE);
    }
}

/// Where the vCPU threads of VMs launched together wait before their first run, until
/// [`StartGate::open`] (or their VM ends). A futex word, not a mutex and condition variable:
/// released together, the threads would queue for the mutex one context switch at a time.
#[derive(Debug, Default)]
pub struct StartGate {
    /// [`GATE_OPEN`] once open; the low bits count [`StartGate::wake`]s.
    word: AtomicU32,
}

/// The gate word's "open" bit.
const GATE_OPEN: u32 = 1 << 31;

impl StartGate {
    /// Lets every waiting vCPU thread go (one wake-up for all).
    pub fn open(&self) {
        self.word.fetch_or(GATE_OPEN, Ordering::SeqCst);
        self.wake_all();
    }

    /// Waits until the gate opens or `ending()`. [`Self::wake`] changes the word, so a waiter
    /// that checked `ending()` just before it never sleeps through it.
    pub(super) fn wait(&self, ending: impl Fn() -> bool) {
        loop {
            let seen = self.word.load(Ordering::SeqCst);
            if seen & GATE_OPEN != 0 || ending() {
                return;
            }
            // SAFETY: FUTEX_WAIT reads the aligned u32 `word`, which outlives the call, and
            // sleeps only while it still holds `seen`; no timeout, no other pointer.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.word.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    seen,
                    std::ptr::null::<libc::timespec>(),
                )
            };
        }
    }

    /// Wakes the waiters to check again whether their VM ends.
    pub(super) fn wake(&self) {
        self.word.fetch_add(1, Ordering::SeqCst);
        self.wake_all();
    }

    fn wake_all(&self) {
        // SAFETY: FUTEX_WAKE only uses the address of `word` as a key; it reads nothing else.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            )
        };
    }
}

/// A one-shot timer that sends the kick signal to the calling thread.
pub struct FirstSlice {
    timer: libc::timer_t,
}

impl FirstSlice {
    /// Arms a timer that kicks the calling thread (`tid`) out of KVM_RUN after `slice`.
    pub fn arm(tid: libc::pid_t, slice: Duration) -> std::io::Result<Self> {
        // SAFETY: an all-zero sigevent is a valid "no notification" value, filled in below.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = super::vcpu::kick_signal();
        event.sigev_notify_thread_id = tid;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; the timer is deleted on drop.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let this = Self { timer };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::c_long::try_from(slice.as_nanos()).unwrap_or(1_000_000),
            },
        };
        // SAFETY: `this.timer` was created above; `spec` is valid; no old value is asked for.
        if unsafe { libc::timer_settime(this.timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(this)
    }

    /// After the first exit: the timer is no longer needed, and the CPU goes to a thread that
    /// has not had its turn.
    pub fn end(self) {
        drop(self);
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

impl Drop for FirstSlice {
    fn drop(&mut self) {
        // SAFETY: the timer was created by `arm` and is deleted once, here.
        unsafe { libc::timer_delete(self.timer) };
    }
}
