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
use std::time::Duration;

/// How long a vCPU runs its guest before its first yield.
pub const FIRST_SLICE: Duration = Duration::from_micros(200);

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
