//! Where a launch's helper threads start. A new thread is queued on its parent's CPU, and with
//! the parent busy there (preparing the launch the helper works for) it would start only once
//! the parent blocks on its first result, so nothing would overlap (measured here: the helper's
//! first VM began 1.7 ms after it was spawned, when the launching thread waited for it).
//! [`spawn_on_another_cpu`] moves the new thread to another CPU before it starts, and the thread
//! then takes back the affinity its parent had, so that what it spawns in turn (a VM's vCPU
//! threads) may run anywhere. Nothing changes on a single-CPU host, or where the affinity
//! cannot be set.
use std::os::unix::thread::JoinHandleExt;
use std::thread::{Builder, JoinHandle};

/// The calling thread's CPU affinity.
fn affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size given.
    let got =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (got == 0).then_some(set)
}

/// The CPU the calling thread runs on.
fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

/// `set` without `cpu`, unless that leaves nothing.
fn without(mut set: libc::cpu_set_t, cpu: usize) -> Option<libc::cpu_set_t> {
    // SAFETY: CPU_CLR and CPU_COUNT only touch `set`; `cpu` is a CPU number the kernel gave,
    // below CPU_SETSIZE.
    let left = unsafe {
        libc::CPU_CLR(cpu, &mut set);
        libc::CPU_COUNT(&set)
    };
    (left > 0).then_some(set)
}

/// Spawns `work` on a thread of `builder` that starts on another CPU than the calling thread's
/// (when there is one), then may run wherever the calling thread may.
pub fn spawn_on_another_cpu<T, F>(builder: Builder, work: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_placed(builder, |_| work()).map(|(handle, _)| handle)
}

/// [`spawn_on_another_cpu`], with what it did: `work` is given the CPU the thread started on
/// (read while it was still kept off the caller's CPU), and the caller gets the CPU the thread
/// was kept off (none when it was not moved).
fn spawn_placed<T, F>(builder: Builder, work: F) -> std::io::Result<(JoinHandle<T>, Option<usize>)>
where
    F: FnOnce(Option<usize>) -> T + Send + 'static,
    T: Send + 'static,
{
    let parents = affinity();
    let here = current_cpu();
    let elsewhere = parents.zip(here).and_then(|(set, here)| without(set, here));
    let (placed_tx, placed_rx) = std::sync::mpsc::channel::<()>();
    let handle = builder.spawn(move || {
        // Placed (or not) before it goes on: then it takes back the parent's affinity.
        let _ = placed_rx.recv();
        let started_on = current_cpu();
        if let Some(set) = parents.filter(|_| elsewhere.is_some()) {
            // SAFETY: `set` is a valid cpu_set_t of the size given.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        }
        work(started_on)
    })?;
    let mut kept_off = None;
    if let Some(set) = &elsewhere {
        // SAFETY: the thread is alive (it waits for `placed_tx`); `set` is a valid cpu_set_t of
        // the size given.
        let placed = unsafe {
            libc::pthread_setaffinity_np(
                handle.as_pthread_t(),
                std::mem::size_of::<libc::cpu_set_t>(),
                set,
            )
        };
        kept_off = here.filter(|_| placed == 0);
    }
    let _ = placed_tx.send(());
    Ok((handle, kept_off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_starts_elsewhere_and_then_may_run_anywhere() {
        // SAFETY: CPU_COUNT only reads the set.
        let count = |s: &libc::cpu_set_t| unsafe { libc::CPU_COUNT(s) };
        let before = affinity().expect("affinity");
        let (handle, kept_off) = spawn_placed(Builder::new(), move |started_on| {
            (started_on, affinity().map(|s| count(&s)))
        })
        .expect("spawn");
        let (started_on, its_cpus) = handle.join().expect("thread");
        assert_eq!(
            its_cpus,
            Some(count(&before)),
            "the parent's affinity, taken back"
        );
        if count(&before) > 1 {
            // The CPU it started on is read while it is still kept off the parent's: where it
            // runs after it took back the parent's affinity is the scheduler's choice.
            assert!(kept_off.is_some(), "moved off the parent's CPU");
            assert!(started_on.is_some(), "its CPU is known");
            assert_ne!(started_on, kept_off, "started on another CPU");
        }
    }
}
