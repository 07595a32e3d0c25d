//! Host-side consumers of Mirrorball's profiler regions (`profiler/ABI.md`).
//!
//! - [`rundir`]: where running VMs publish their regions, and [`discover`] / [`scan`] to find
//!   them; [`VmHandle::open`] maps both regions read-only and validates them.
//! - [`OpenVm`]: polls new guest and host samples ([`Batch`]), reads vCPU slots and the task
//!   table. Every byte of the guest region is treated as hostile: the ABI crate validates and
//!   bounds every read, polls take a bounded number of steps, and a file that shrinks under its
//!   mapping is noticed before it is read.
//! - [`model`]: per VM / vCPU / task rates (guest minor and major faults, KVM `pf_taken`, host
//!   faults, CPU) with history, fed by batches.
//! - [`record`]: `vmm record` (CSV or JSON lines) and reading records back.
//! - [`plot`]: `vmm plot` (PNG and SVG through `plotters`).
//! - [`top`]: `vmm top` (ratatui).
//! - [`prometheus`]: `vmm prometheus` (text exposition, once or served on loopback).
//! - [`publish`]: the publishing side of the run-directory protocol (the VMM, `fake_vm`, tests).
//! - [`userfile`]: opening the files a user names without blocking or unbounded reads.

pub mod fleet;
pub mod mapping;
pub mod model;
pub mod open;
pub mod plot;
pub mod prometheus;
pub mod publish;
pub mod record;
pub mod rundir;
mod sigbus;
pub mod top;
pub mod userfile;

pub use model::{Model, ModelConfig, TaskKey, VmModel};
pub use open::{Batch, Loss, OpenError, OpenVm, PollLimits, Ring, VcpuRow, VmStatus};
pub use rundir::{discover, resolve_run_dir, scan, Scan, StaleVm, VmHandle, VmId, VmMeta};

/// An error with a one-line message.
#[derive(Debug)]
pub struct Error {
    message: String,
    kind: Option<std::io::ErrorKind>,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: None,
        }
    }

    /// True if it came from writing to a closed pipe.
    pub fn is_broken_pipe(&self) -> bool {
        self.kind == Some(std::io::ErrorKind::BrokenPipe)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self {
            message: e.to_string(),
            kind: Some(e.kind()),
        }
    }
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Self {
        Self::new(e.to_string())
    }
}

/// Text from untrusted bytes, safe to print on a terminal or in a file: the bytes before the
/// first NUL, invalid UTF-8 replaced, control characters (C0, DEL, C1) and bidirectional
/// overrides replaced by `?`, at most `max_chars` characters.
pub fn sanitize(bytes: &[u8], max_chars: usize) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
        .chars()
        .take(max_chars)
        .map(|c| {
            let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// A task's command name as text ([`sanitize`]d).
pub fn comm_text(comm: &mirrorball_profiler_abi::Comm) -> String {
    sanitize(comm, comm.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_strips_terminal_tricks() {
        assert_eq!(sanitize(b"work\0junk", 16), "work");
        assert_eq!(sanitize(b"\x1b[2Jx\x07", 16), "?[2Jx?");
        assert_eq!(sanitize(&[0xff, b'a'], 16), "\u{fffd}a");
        assert_eq!(sanitize("a\u{202e}b\u{85}".as_bytes(), 16), "a?b?");
        assert_eq!(sanitize(b"abcdef", 3), "abc");
        assert_eq!(
            comm_text(&mirrorball_profiler_abi::comm_from(b"work")),
            "work"
        );
    }
}
