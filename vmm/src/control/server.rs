//! A VM's control socket: a Unix socket in the run directory, served from the session's event
//! loop without ever blocking it. The listener and every client are non-blocking; received
//! bytes are split into bounded lines and parsed here; the requests wait in an [`Inbox`] that
//! the session drains after each turn of the loop, answering through [`Pending::reply`].
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::protocol::{parse_request, Line, LineBuffer, Reply, Request};

/// Most clients connected to one VM at once; one more is told so and closed.
pub const MAX_CLIENTS: usize = 16;
/// Most bytes read from one client per readiness event (the loop serves the others too).
const READ_BUDGET: usize = 64 * 1024;

/// A request waiting for the session, and where its reply goes.
pub struct Pending {
    /// The parsed request, or the error to answer with.
    pub request: Result<Request, String>,
    stream: UnixStream,
}

impl Pending {
    /// Sends `reply` as one line. The stream is non-blocking: a client that does not read its
    /// replies loses them rather than stall the loop.
    pub fn reply(&self, reply: &Reply) {
        let _ = (&self.stream).write_all(&reply.to_line());
    }
}

/// Requests received and not yet handled.
pub type Inbox = Arc<Mutex<Vec<Pending>>>;

/// Removes the socket file when dropped.
#[derive(Debug)]
pub struct SocketPath(PathBuf);

impl SocketPath {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The listening socket and its clients (an event-loop subscriber).
pub struct ControlSocket {
    listener: UnixListener,
    clients: HashMap<RawFd, (UnixStream, LineBuffer)>,
    inbox: Inbox,
}

/// Creates the control socket at `path` (mode 0600): bound under a hidden temporary name in the
/// same private directory, made private, then renamed into place, so no one can connect before
/// its mode is set and a stale socket of a dead VMM is replaced.
pub fn bind(path: &Path) -> std::io::Result<(ControlSocket, SocketPath, Inbox)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "bad socket path"))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| listener.set_nonblocking(true))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let inbox: Inbox = Arc::default();
    Ok((
        ControlSocket {
            listener,
            clients: HashMap::new(),
            inbox: inbox.clone(),
        },
        SocketPath(path.to_path_buf()),
        inbox,
    ))
}

impl ControlSocket {
    fn accept_all(&mut self, ops: &mut EventOps) {
        // Bounded: at most a few connections per wake-up; the rest wait for the next one.
        for _ in 0..MAX_CLIENTS {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                let line = Reply::error(None, format!("too many clients (at most {MAX_CLIENTS})"))
                    .to_line();
                let _ = (&stream).write_all(&line);
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.clients.insert(fd, (stream, LineBuffer::default()));
            }
        }
    }

    fn serve(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some((stream, lines)) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut budget = READ_BUDGET;
        let mut closed = false;
        let mut got = Vec::new();
        while budget > 0 {
            match stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    got.extend(lines.push(&buf[..n]));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if !got.is_empty() {
            let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
            for line in got {
                let Ok(reply_to) = stream.try_clone() else {
                    continue;
                };
                let request = match line {
                    Line::Complete(l) => parse_request(&l),
                    Line::TooLong => Err(format!(
                        "request longer than {} bytes",
                        super::protocol::MAX_LINE
                    )),
                };
                inbox.push(Pending {
                    request,
                    stream: reply_to,
                });
            }
        }
        if closed {
            if let Some((stream, _)) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::new(&stream, EventSet::IN));
            }
        }
    }
}

impl MutEventSubscriber for ControlSocket {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.listener, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_all(ops);
        } else if events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
            && !events.event_set().contains(EventSet::IN)
        {
            if let Some((stream, _)) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::new(&stream, EventSet::IN));
            }
        } else {
            self.serve(fd, ops);
        }
    }
}
