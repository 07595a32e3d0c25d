//! The budget's watchdog: a child process forked while the VMM is still single-threaded and
//! outside its budget cgroup. Every 50 ms it looks at the cgroup; when the cgroup's tasks have
//! waited for memory the kernel cannot reclaim for [`STALL_LIMIT`] (v1 `under_oom`, a v2 OOM
//! event, or swap full with the charge at the limit), it lifts the limit (so the stalled threads
//! can run to their end), sends the VMM SIGTERM and exits. It dies with the VMM
//! (`PR_SET_PDEATHSIG`) and never touches the host state the VMM restores.
use std::time::{Duration, Instant};

use super::cgroup::BudgetCgroup;
use super::swap;

/// How long the cgroup may wait for memory before the budget counts as exhausted.
pub const STALL_LIMIT: Duration = Duration::from_secs(3);
const PERIOD: Duration = Duration::from_millis(50);

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
    loop {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            return;
        }
        let swap_full = swap_size.is_some_and(|size| {
            swap::free_bytes() < (size / 32).max(4 << 20)
                && cgroup.usage() + (1 << 20) >= cgroup.limit
        });
        stalled_since = if cgroup.out_of_memory() || swap_full {
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
