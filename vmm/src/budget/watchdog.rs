//! The budget's watchdog: a child process forked while the VMM is still single-threaded and
//! outside its budget cgroup. Every 50 ms it looks at the cgroup. When tasks wait for memory
//! (v1 `under_oom`) while swap has room, it gives a breath: the limit [`BREATH`] higher for a
//! moment, then the budget again. When swap is full with the charge at the limit (or tasks wait
//! and there is no swap) for [`STALL_LIMIT`], it lifts the limit (so the stalled threads can run
//! to their end), sends the VMM SIGTERM and exits. It dies with the VMM
//! (`PR_SET_PDEATHSIG`) and never touches the host state the VMM restores.
use std::time::{Duration, Instant};

use super::cgroup::BudgetCgroup;
use super::swap;

/// How long the cgroup may wait for memory before the budget counts as exhausted.
pub const STALL_LIMIT: Duration = Duration::from_secs(3);
const PERIOD: Duration = Duration::from_millis(50);
/// How far a breath lets the charge go over the budget, for a moment.
pub const BREATH: u64 = 4 << 20;
/// How long tasks wait for memory before a breath.
const BREATH_AFTER: Duration = Duration::from_millis(200);

/// The running watchdog; dropping it ends it.
pub struct Watchdog {
    pid: libc::pid_t,
}

fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

impl Watchdog {
    /// Forks the watchdog for `cgroup` (whose swap file, if the budget made one, has
    /// `swap_size` bytes). None when the process already has other threads (forking then is
    /// not safe): the budget then holds without it, and a stall is a long wait.
    pub fn spawn(cgroup: &BudgetCgroup, swap_size: Option<u64>) -> Option<Self> {
        if !single_threaded() {
            return None;
        }
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the process has one thread (checked above), so the child's copy of the heap
        // and of every lock is consistent.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => None,
            0 => {
                // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                watch(cgroup, swap_size, parent);
                // SAFETY: _exit ends the child without running the parent's destructors or
                // exit handlers (the cgroup and swap belong to the parent).
                unsafe { libc::_exit(0) }
            }
            pid => Some(Self { pid }),
        }
    }
}

fn watch(cgroup: &BudgetCgroup, swap_size: Option<u64>, parent: libc::pid_t) {
    let mut stalled_since: Option<Instant> = None;
    let mut waiting_since: Option<Instant> = None;
    let mut raised = false;
    loop {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            return;
        }
        let swap_full = swap_size.is_some_and(|size| {
            swap::free_bytes() < (size / 32).max(4 << 20)
                && cgroup.usage() + (1 << 20) >= cgroup.limit
        });
        let waiting = cgroup.out_of_memory();
        // v1: tasks waiting for memory are woken only when some is freed; reclaim that fell
        // behind (pages still being written to swap) leaves them waiting while swap has room.
        // A breath — BREATH more for a moment, then the budget again (which makes the
        // writer reclaim) — lets them go on.
        if waiting && !swap_full {
            waiting_since = waiting_since.or_else(|| Some(Instant::now()));
            if waiting_since.is_some_and(|t| t.elapsed() >= BREATH_AFTER) {
                cgroup.set_limit(cgroup.limit + BREATH);
                std::thread::sleep(Duration::from_millis(20));
                raised = true;
                waiting_since = None;
            }
        } else {
            waiting_since = None;
        }
        if raised && cgroup.set_limit(cgroup.limit) {
            raised = false;
        }
        stalled_since = if swap_full || (waiting && swap_size.is_none()) {
            stalled_since.or_else(|| Some(Instant::now()))
        } else {
            None
        };
        if stalled_since.is_some_and(|t| t.elapsed() >= STALL_LIMIT) {
            cgroup.lift();
            // SAFETY: signalling the parent, which handles SIGTERM by ending its VMs.
            unsafe { libc::kill(parent, libc::SIGTERM) };
            return;
        }
        std::thread::sleep(PERIOD);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // SAFETY: our own child; reaped right after.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}
