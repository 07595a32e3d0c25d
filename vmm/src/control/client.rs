//! `vmm ctl NAME COMMAND`: finds the VM's control socket the way `vmm top` finds its regions
//! (the run directory's live VMs, by name or `PID-N` id), sends one request, prints the reply.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use mirrorball_monitor::rundir::{discover, VmId};

use super::protocol::{Command, Reply, Request};

/// Exit code: no running VM has that name (or it has no control socket).
pub const EXIT_NO_SUCH_VM: i32 = 20;
/// Exit code: the VM answered with an error (the VM is untouched).
pub const EXIT_REFUSED: i32 = 21;

/// Why a request could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// No live VM matched.
    #[error("no running VM named {name:?} in {dir} (see vmm top)")]
    NoSuchVm {
        /// The name asked for.
        name: String,
        /// The run directory.
        dir: String,
    },
    /// Several VMs have the name.
    #[error("{count} running VMs are named {name:?}: give one's id instead ({ids})")]
    Ambiguous {
        /// The name asked for.
        name: String,
        /// How many.
        count: usize,
        /// Their ids.
        ids: String,
    },
    /// Connecting, sending or receiving failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The reply was not one JSON line.
    #[error("control socket {path}: bad reply: {why}")]
    BadReply {
        /// The socket.
        path: String,
        /// Why.
        why: String,
    },
}

impl CtlError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NoSuchVm { .. } | Self::Ambiguous { .. } => EXIT_NO_SUCH_VM,
            _ => crate::exit::EXIT_VMM_ERROR,
        }
    }
}

/// The control socket of the live VM called `name` (its metadata name or its `PID-N` id).
pub fn find_socket(run_dir: &Path, name: &str) -> Result<std::path::PathBuf, CtlError> {
    let live = discover(run_dir);
    let by_id = name.parse::<VmId>().ok();
    let matches: Vec<_> = live
        .iter()
        .filter(|vm| Some(vm.id) == by_id || vm.meta.as_ref().is_some_and(|m| m.name == name))
        .filter(|vm| vm.ctl_path().exists())
        .collect();
    match matches.as_slice() {
        [vm] => Ok(vm.ctl_path()),
        [] => Err(CtlError::NoSuchVm {
            name: name.to_string(),
            dir: run_dir.display().to_string(),
        }),
        many => Err(CtlError::Ambiguous {
            name: name.to_string(),
            count: many.len(),
            ids: many
                .iter()
                .map(|vm| vm.id.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Sends `command` to the socket at `path` and waits up to `timeout` for the reply.
pub fn request(path: &Path, command: Command, timeout: Duration) -> Result<Reply, CtlError> {
    let io = |source| CtlError::Io {
        path: path.display().to_string(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let line = request_line(&Request { command, id: None });
    (&stream).write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .take_line(&mut reply, 64 * 1024)
        .map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| CtlError::BadReply {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// The request as one line, newline included.
pub fn request_line(request: &Request) -> Vec<u8> {
    let mut value = serde_json::to_value(&request.command).unwrap_or_default();
    if let (Some(id), Some(object)) = (request.id, value.as_object_mut()) {
        object.insert("id".into(), id.into());
    }
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    line
}

trait TakeLine {
    fn take_line(&mut self, out: &mut String, limit: u64) -> std::io::Result<usize>;
}

impl<R: BufRead> TakeLine for R {
    fn take_line(&mut self, out: &mut String, limit: u64) -> std::io::Result<usize> {
        use std::io::Read;
        let n = self.by_ref().take(limit).read_line(out)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the VM closed the connection without a reply",
            ));
        }
        Ok(n)
    }
}
