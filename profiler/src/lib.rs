//! Host-side accounting for Mirrorball.
//!
//! The VMM's vCPU loop uses this crate to explain where a vCPU's time and faults went:
//!
//! - [`kvm_stats`] — KVM binary statistics (`KVM_GET_STATS_FD`) for a VM or vCPU: parse once,
//!   sample with one `pread`.
//! - [`thread_usage`] — `getrusage(RUSAGE_THREAD)` (host faults and CPU time of the calling thread)
//!   and the process's resident memory from `/proc/self/status`.
//! - [`exits`] — exit-reason counters kept by the VMM itself (this host's KVM does not count every
//!   exit kind in its own stats).
//! - [`vcpu_accounting`] — the per-vCPU picture: time in `KVM_RUN` vs in the VMM, exits, and
//!   thread-usage and KVM-stat deltas over a run, as a serialisable [`VcpuReport`].
//! - [`report`] — writing reports as JSON.
//! - [`testing`] — what the workspace's test suites share (skipping without `/dev/kvm`).

mod error;
pub mod exits;
pub mod kvm_stats;
pub mod report;
pub mod testing;
pub mod thread_usage;
pub mod vcpu_accounting;

pub use error::Error;
pub use exits::{ExitCounters, ExitKind};
pub use kvm_stats::{StatDesc, StatKind, StatsFd, StatsSample};
pub use report::write_json;
pub use thread_usage::{ProcessMemory, ThreadUsage};
pub use vcpu_accounting::{VcpuAccounting, VcpuReport};
