//! The userfaultfd system interface the pager uses: the descriptor, its API handshake and the
//! range ioctls (register, copy, zero page, write-protect, wake), with the kernel's ABI structs
//! (`include/uapi/linux/userfaultfd.h`) declared here so no bindgen step is needed.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xAA;
/// Faults of the threads this process runs are reported with the thread's id.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// MISSING mode works on shmem (memfd) mappings.
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// Write-protect mode works on shmem (memfd) mappings.
pub const FEATURE_WP_SHMEM: u64 = 1 << 12;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_COPY_MODE_DONTWAKE` and `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
const MODE_DONTWAKE: u64 = 1 << 0;

/// A page-fault event.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// The fault is a write to a write-protected page.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

// _IOWR/_IOR(0xAA, nr, size): dir << 30 | size << 16 | 0xAA << 8 | nr.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const RW: u64 = 3;
const R: u64 = 2;
const UFFDIO_API: u64 = ioc(RW, 0x3F, std::mem::size_of::<ApiArg>());
const UFFDIO_REGISTER: u64 = ioc(RW, 0x00, std::mem::size_of::<RegisterArg>());
const UFFDIO_UNREGISTER: u64 = ioc(R, 0x01, std::mem::size_of::<Range>());
const UFFDIO_WAKE: u64 = ioc(R, 0x02, std::mem::size_of::<Range>());
const UFFDIO_COPY: u64 = ioc(RW, 0x03, std::mem::size_of::<CopyArg>());
const UFFDIO_ZEROPAGE: u64 = ioc(RW, 0x04, std::mem::size_of::<ZeroArg>());
const UFFDIO_WRITEPROTECT: u64 = ioc(RW, 0x06, std::mem::size_of::<WriteProtectArg>());

#[repr(C)]
#[derive(Default)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct ZeroArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct WriteProtectArg {
    range: Range,
    mode: u64,
}

/// One message read from the descriptor (`struct uffd_msg`, 32 bytes, packed).
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultMsg {
    /// The event (`EVENT_PAGEFAULT` is the only one the pager asks for).
    pub event: u8,
    /// `PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// The faulting address (page-aligned).
    pub address: u64,
    /// The faulting thread.
    pub tid: u32,
}

impl FaultMsg {
    /// Size of one message.
    pub const SIZE: usize = 32;

    /// Decodes one message.
    pub fn parse(bytes: &[u8; Self::SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_ne_bytes(b)
        };
        let mut tid = [0u8; 4];
        tid.copy_from_slice(&bytes[24..28]);
        Self {
            event: bytes[0],
            flags: u64_at(8),
            address: u64_at(16),
            tid: u32::from_ne_bytes(tid),
        }
    }
}

/// An open userfaultfd whose API handshake asked for `features`.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

/// The outcome of a copy or zero-page ioctl.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// The page was installed (and the waiting threads woken).
    Done,
    /// Someone else installed the page first.
    Exists,
}

impl Uffd {
    /// Opens a userfaultfd (non-blocking, close-on-exec) that also sees faults taken in kernel
    /// mode on behalf of this process (KVM's), and enables `features`; fails when the kernel
    /// lacks any of them.
    pub fn open(features: u64) -> io::Result<Self> {
        // SAFETY: the syscall takes flags only and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let uffd = Self { fd };
        let mut api = ApiArg {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        uffd.ioctl(UFFDIO_API, &mut api)?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: `arg` is the struct this request reads and writes, live for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `[start, start+len)` for missing-page and write-protect faults.
    pub fn register(&self, start: usize, len: usize) -> io::Result<()> {
        let mut arg = RegisterArg {
            range: range(start, len),
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut arg)
    }

    /// Registers `[start, start+len)` for missing-page faults only.
    pub fn register_missing(&self, start: usize, len: usize) -> io::Result<()> {
        let mut arg = RegisterArg {
            range: range(start, len),
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut arg)
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        self.ioctl(UFFDIO_UNREGISTER, &mut range(start, len))
    }

    /// Wakes the threads waiting on faults in a range (they retry the access).
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        self.ioctl(UFFDIO_WAKE, &mut range(start, len))
    }

    /// Installs a copy of `src` (one page) at `dst` and wakes the waiters.
    pub fn copy(&self, dst: usize, src: &[u8]) -> io::Result<Fill> {
        let mut arg = CopyArg {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        fill(self.ioctl(UFFDIO_COPY, &mut arg))
    }

    /// Copies `src` (whole pages) to `dst` without waking the waiters, up to the first page
    /// that is already there: returns the bytes copied (0 when the first page is there).
    pub fn copy_until_present(&self, dst: usize, src: &[u8]) -> io::Result<usize> {
        let mut arg = CopyArg {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: MODE_DONTWAKE,
            copy: 0,
        };
        let result = self.ioctl(UFFDIO_COPY, &mut arg);
        done_until_present(result, arg.copy)
    }

    /// Installs zeroed pages at `[dst, dst+len)` without waking the waiters, up to the first
    /// page that is already there: returns the bytes installed (0 when the first page is there).
    pub fn zero_until_present(&self, dst: usize, len: usize) -> io::Result<usize> {
        let mut arg = ZeroArg {
            range: range(dst, len),
            mode: MODE_DONTWAKE,
            zeropage: 0,
        };
        let result = self.ioctl(UFFDIO_ZEROPAGE, &mut arg);
        done_until_present(result, arg.zeropage)
    }

    /// Installs a zeroed page at `dst` and wakes the waiters.
    pub fn zero(&self, dst: usize, len: usize) -> io::Result<Fill> {
        let mut arg = ZeroArg {
            range: range(dst, len),
            mode: 0,
            zeropage: 0,
        };
        fill(self.ioctl(UFFDIO_ZEROPAGE, &mut arg))
    }

    /// Write-protects a range (`protect`) or lifts the protection (waking the waiters).
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut arg = WriteProtectArg {
            range: range(start, len),
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut arg)
    }

    /// Reads the pending messages into `out` (none when nothing is pending).
    pub fn read_messages(&self, out: &mut Vec<FaultMsg>) -> io::Result<()> {
        out.clear();
        let mut buf = [0u8; FaultMsg::SIZE * 16];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(e),
            };
        }
        let n = usize::try_from(n).unwrap_or(0);
        for chunk in buf[..n].chunks_exact(FaultMsg::SIZE) {
            let mut one = [0u8; FaultMsg::SIZE];
            one.copy_from_slice(chunk);
            out.push(FaultMsg::parse(&one));
        }
        Ok(())
    }

    /// The descriptor, for `poll`.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A thread that answers a userfaultfd's faults ([`serve`]); dropping it stops and joins it.
#[derive(Debug)]
pub struct FaultThread {
    /// Written to stop the thread; closed only after the thread ended.
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultThread {
    /// Starts thread `name` running `run`, given the descriptor to pass to [`serve`] as `stop`.
    pub fn spawn(name: &str, run: impl FnOnce(RawFd) + Send + 'static) -> io::Result<Self> {
        // SAFETY: eventfd takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(raw))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd this object owns.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers the faults of `uffd` with `on_fault`, every message as it comes, until `stop` (an
/// eventfd) is written or the descriptor fails: the loop of a fault thread. After a fault it
/// looks for the next one for `spin` before it sleeps in `poll`.
pub fn serve(
    uffd: &Uffd,
    stop: RawFd,
    spin: std::time::Duration,
    mut on_fault: impl FnMut(&FaultMsg),
) {
    let mut messages = Vec::new();
    // Faults may come in bursts (a guest touching its memory in order): until this instant,
    // look for the next one without sleeping, which would cost a wake-up of this thread each.
    let mut spin_until = std::time::Instant::now();
    loop {
        let spinning = std::time::Instant::now() < spin_until;
        if !spinning {
            let mut fds = [
                libc::pollfd {
                    fd: uffd.raw(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
        }
        if uffd.read_messages(&mut messages).is_err() {
            return;
        }
        if messages.is_empty() {
            if spinning {
                std::hint::spin_loop();
            }
            continue;
        }
        for msg in messages.iter().filter(|m| m.event == EVENT_PAGEFAULT) {
            on_fault(msg);
        }
        spin_until = std::time::Instant::now() + spin;
    }
}

fn range(start: usize, len: usize) -> Range {
    Range {
        start: start as u64,
        len: len as u64,
    }
}

/// What a range ioctl did: all of it (success), the bytes it filled before a page that was
/// already there (`EAGAIN` with a positive count), or nothing because the first page was there
/// (`EEXIST`).
fn done_until_present(result: io::Result<()>, done: i64) -> io::Result<usize> {
    match result {
        Ok(()) => Ok(usize::try_from(done).unwrap_or(0)),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(0),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && done > 0 => {
            Ok(usize::try_from(done).unwrap_or(0))
        }
        Err(e) => Err(e),
    }
}

fn fill(result: io::Result<()>) -> io::Result<Fill> {
    match result {
        Ok(()) => Ok(Fill::Done),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Fill::Exists),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
    }

    #[test]
    fn a_fault_message_decodes() {
        let mut b = [0u8; FaultMsg::SIZE];
        b[0] = EVENT_PAGEFAULT;
        b[8..16].copy_from_slice(&PAGEFAULT_FLAG_WP.to_ne_bytes());
        b[16..24].copy_from_slice(&0x7f00_0000_1000u64.to_ne_bytes());
        b[24..28].copy_from_slice(&4242u32.to_ne_bytes());
        let m = FaultMsg::parse(&b);
        assert_eq!(
            (m.event, m.flags, m.address, m.tid),
            (EVENT_PAGEFAULT, 2, 0x7f00_0000_1000, 4242)
        );
    }
}
