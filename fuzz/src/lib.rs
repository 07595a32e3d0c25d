//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! [`Bytes`] turns the fuzzer's input into a stream of small decisions. It never fails: once the
//! input is exhausted every read returns zeros, so every input decodes to *some* finite sequence
//! of operations and the targets need no error paths of their own.

/// A forgiving little-endian reader over the fuzzer's input.
#[derive(Debug, Clone)]
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }

    /// The next byte, 0 past the end.
    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// The next `N` bytes, zero-padded past the end.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let src = self.take(N);
        out[..src.len()].copy_from_slice(src);
        out
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A value in `0..n` (`n` > 0) from one byte.
    pub fn below(&mut self, n: u8) -> u8 {
        self.u8() % n.max(1)
    }
}

/// An anonymous in-memory file (`memfd_create`) holding `data`, rewound to the start.
///
/// Used instead of a temporary file so that parallel fuzzing jobs never share a path and nothing
/// is left behind in `/tmp`. `/proc/self/fd/<fd>` names it where an API wants a path.
pub fn memfd_with(data: &[u8]) -> std::fs::File {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;

    // SAFETY: the name is a valid NUL-terminated string; the flags are plain constants.
    let fd = unsafe { libc::memfd_create(c"mirrorball-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        fd >= 0,
        "memfd_create failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new descriptor that nothing else owns; the `File` closes it on drop.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(data).expect("writing the memfd");
    file.rewind().expect("rewinding the memfd");
    file
}
