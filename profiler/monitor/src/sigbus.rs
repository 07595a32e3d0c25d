//! Surviving a shared file that shrinks under its mapping.
//!
//! Touching a page of a `MAP_SHARED` file mapping beyond the file's end raises `SIGBUS`, which
//! kills the process. Region files live in a shared directory, so anyone who can open them (the
//! same user, root) can truncate them while a reader or the VMM has them mapped. Sealing them is
//! not possible (tmpfs allows seals only on memfds, which cannot be linked into a directory), so
//! every region mapping is registered here instead: a `SIGBUS` whose address lies in a registered
//! mapping replaces that whole mapping, in the signal handler, with anonymous zero pages of the
//! same size (`MAP_FIXED`), marks it as faulted and returns, so the access completes (reading
//! zeros, which no region validates as) and the owner learns of it through
//! [`MappingGuard::faulted`]. Any other `SIGBUS` goes to the handler installed before (Rust's
//! stack-overflow handler, or the default action).
//!
//! The registry is a fixed table of [`SLOTS`] entries of atomics, the only thing the handler
//! reads: registration and removal never allocate or lock.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Most mappings registered at once (two per VM a process watches or hosts).
pub const SLOTS: usize = 1024;

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const CLEAR: AtomicBool = AtomicBool::new(false);
static STARTS: [AtomicUsize; SLOTS] = [EMPTY; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [EMPTY; SLOTS];
static FAULTED: [AtomicBool; SLOTS] = [CLEAR; SLOTS];
/// The action installed before ours (set once, before ours is installed).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered mapping; unregistered on drop (before the owner unmaps it).
#[derive(Debug)]
pub(crate) struct MappingGuard {
    slot: usize,
}

impl MappingGuard {
    /// True once a `SIGBUS` replaced the mapping with zero pages: the file shrank.
    pub(crate) fn faulted(&self) -> bool {
        FAULTED[self.slot].load(Ordering::Acquire)
    }
}

impl Drop for MappingGuard {
    fn drop(&mut self) {
        LENS[self.slot].store(0, Ordering::Release);
        FAULTED[self.slot].store(false, Ordering::Release);
        STARTS[self.slot].store(0, Ordering::Release);
    }
}

/// Registers the mapping `[ptr, ptr + len)` (installing the handler on first use).
pub(crate) fn register(ptr: *mut u8, len: usize) -> io::Result<MappingGuard> {
    install()?;
    let start = ptr as usize;
    for slot in 0..SLOTS {
        if STARTS[slot]
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            FAULTED[slot].store(false, Ordering::Release);
            LENS[slot].store(len, Ordering::Release);
            return Ok(MappingGuard { slot });
        }
    }
    Err(io::Error::other(format!(
        "more than {SLOTS} region mappings at once"
    )))
}

fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: plain-data structs filled by the kernel or by us; the handler only touches
        // atomics and calls mmap/sigaction.
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            let _ = PREVIOUS.set(previous);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    (*result).map_err(io::Error::from_raw_os_error)
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in 0..SLOTS {
        let start = STARTS[slot].load(Ordering::Acquire);
        let len = LENS[slot].load(Ordering::Acquire);
        if start == 0 || len == 0 || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: replaces exactly a mapping this process registered (and has not unmapped:
        // owners unregister first) with private zero pages of the same size.
        let ptr = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if ptr != libc::MAP_FAILED {
            FAULTED[slot].store(true, Ordering::Release);
            return;
        }
        break;
    }
    chain(sig, info, ctx);
}

/// Passes a `SIGBUS` that is not ours to the previous handler, or restores the default action
/// so that returning re-raises it fatally.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let previous = PREVIOUS.get();
    let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: restores the default action; the faulting access repeats and kills us.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
        return;
    }
    let siginfo = previous.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
    if siginfo {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}
