//! The crate's single error type.
//!
//! Owns [`Error`]: every fallible function in the profiler returns it. Variants that come from
//! parsing kernel-provided data (KVM stats fd, `/proc`) say which bound was violated, so a caller
//! can log a precise reason instead of guessing.

use std::io;

/// Errors returned by the profiler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_GET_STATS_FD` failed on a VM or vCPU fd.
    #[error("KVM_GET_STATS_FD ioctl failed: {0}")]
    GetStatsFd(#[source] io::Error),

    /// An I/O operation failed (`what` names the operation).
    #[error("{what}: {source}")]
    Io {
        /// The operation that failed.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A read of `len` bytes at `offset` ended early: the file is shorter than its header says.
    #[error("stats file truncated: {what} needs {len} bytes at offset {offset}")]
    Truncated {
        /// Which part of the file was being read.
        what: &'static str,
        /// File offset of the read.
        offset: u64,
        /// Number of bytes requested.
        len: usize,
    },

    /// A header field of the stats file is outside the range this parser accepts.
    #[error("stats header field {field} = {value} is out of range (limit {limit})")]
    HeaderOutOfRange {
        /// Header field name.
        field: &'static str,
        /// Value found in the file.
        value: u64,
        /// Accepted limit (maximum, or minimum for offsets that must follow the header).
        limit: u64,
    },

    /// A descriptor points at data that is misaligned or outside the accepted data block.
    #[error(
        "stats descriptor {index} ({name:?}): offset {offset} size {size} is invalid: {reason}"
    )]
    BadDescriptor {
        /// Index of the descriptor in the file.
        index: usize,
        /// The descriptor's name (may be empty if the name itself was unreadable).
        name: String,
        /// Byte offset into the data block.
        offset: u32,
        /// Number of `u64` values.
        size: u16,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A `/proc` file did not contain what was expected.
    #[error("cannot parse {file}: {reason}")]
    Proc {
        /// The file that was parsed.
        file: &'static str,
        /// What was wrong.
        reason: String,
    },

    /// JSON serialisation failed.
    #[error("JSON serialisation failed: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub(crate) fn io(what: &'static str, source: io::Error) -> Self {
        Error::Io { what, source }
    }
}
