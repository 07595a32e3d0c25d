//! A budgeted `vmm` runs without restartable sequences (rseq).
//!
//! glibc registers every thread's `struct rseq` (in its thread control block) with the kernel,
//! which writes the thread's CPU number there whenever the thread returns to user space after
//! being preempted or migrated. Under a memory budget that page may be swapped out; when the
//! cgroup cannot charge it back at that moment the write fails and the kernel kills the process
//! with SIGSEGV (`SI_KERNEL`): measured here as 4 in 10 runs of one 64 MiB VM under
//! `--machine-mem 80M`, 0 in 10 without rseq. Nothing in `vmm` uses rseq, so a process that takes
//! a budget executes itself again with glibc's `glibc.pthread.rseq=0` tunable before it does
//! anything else.
use std::ffi::{OsStr, OsString};

/// The environment variable of glibc's tunables.
pub const TUNABLES: &str = "GLIBC_TUNABLES";
/// The tunable that keeps glibc from registering rseq.
pub const NO_RSEQ: &str = "glibc.pthread.rseq=0";

/// Whether `args` (without the program name) ask for a budget.
pub fn wants_budget<S: AsRef<OsStr>>(args: &[S]) -> bool {
    args.iter().any(|a| {
        let a = a.as_ref().to_string_lossy();
        a == "--machine-mem" || a.starts_with("--machine-mem=")
    })
}

/// `GLIBC_TUNABLES` with rseq off, keeping tunables already set; `None` when rseq is off already.
pub fn tunables_without_rseq(current: Option<&OsStr>) -> Option<OsString> {
    match current.map(OsStr::to_string_lossy) {
        Some(t) if t.split(':').any(|x| x == NO_RSEQ) => None,
        Some(t) if !t.is_empty() => Some(format!("{t}:{NO_RSEQ}").into()),
        _ => Some(NO_RSEQ.into()),
    }
}

/// When the command line asks for a budget and rseq is still on, executes this program again
/// with rseq off (same arguments); returns only when that is not needed or `exec` failed (the
/// run then goes on with rseq, as before).
pub fn exec_without_rseq_if_budgeted() {
    use std::os::unix::process::CommandExt;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if !wants_budget(&args) {
        return;
    }
    let Some(tunables) = tunables_without_rseq(std::env::var_os(TUNABLES).as_deref()) else {
        return;
    };
    let err = std::process::Command::new("/proc/self/exe")
        .args(&args)
        .env(TUNABLES, tunables)
        .exec();
    eprintln!("vmm: cannot run again without rseq ({err}); going on with it");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_budget_turns_rseq_off_once() {
        assert!(wants_budget(&["--workload", "x", "--machine-mem", "80M"]));
        assert!(wants_budget(&["--machine-mem=1G"]));
        assert!(!wants_budget(&["--mem", "80M", "--machine"]));
        assert_eq!(tunables_without_rseq(None), Some(NO_RSEQ.into()));
        assert_eq!(
            tunables_without_rseq(Some(OsStr::new(""))),
            Some(NO_RSEQ.into())
        );
        assert_eq!(
            tunables_without_rseq(Some(OsStr::new("glibc.malloc.check=3"))),
            Some(format!("glibc.malloc.check=3:{NO_RSEQ}").into())
        );
        assert_eq!(
            tunables_without_rseq(Some(OsStr::new(
                "glibc.malloc.check=3:glibc.pthread.rseq=0"
            ))),
            None
        );
    }
}
