//! The driver's `/proc/mirrorball` interface: where it is, registering and unregistering a pid
//! through `status`, and reading the registered list back.
//!
//! The directory is `/proc/mirrorball`, unless `--proc DIR` or the environment variable
//! [`PROC_DIR_ENV`] names another one (tests point it at a temporary directory holding a plain
//! `status` file). Each command is one `write(2)` of `R <pid>\n` or `U <pid>\n`, as the driver
//! parses one command per write; its errno is translated into a one-line reason.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The driver's directory in procfs.
pub const DEFAULT_PROC_DIR: &str = "/proc/mirrorball";
/// Environment variable that overrides [`DEFAULT_PROC_DIR`].
pub const PROC_DIR_ENV: &str = "MIRRORBALL_PROC_DIR";
/// Largest `status` listing read (the driver lists at most 1024 tasks of < 40 bytes each).
const MAX_STATUS_BYTES: u64 = 1 << 20;

/// The procfs directory: `explicit` if given, else `$MIRRORBALL_PROC_DIR` if set and non-empty,
/// else [`DEFAULT_PROC_DIR`].
pub fn proc_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    match std::env::var_os(PROC_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_PROC_DIR),
    }
}

/// The `status` file in `dir`.
pub fn status_path(dir: &Path) -> PathBuf {
    dir.join("status")
}

/// Register (`R`) or unregister (`U`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `R <pid>`: start sampling the task.
    Register,
    /// `U <pid>`: stop sampling it.
    Unregister,
}

impl Command {
    /// The command letter.
    pub fn letter(self) -> char {
        match self {
            Command::Register => 'R',
            Command::Unregister => 'U',
        }
    }

    /// `"register"` or `"unregister"`.
    pub fn verb(self) -> &'static str {
        match self {
            Command::Register => "register",
            Command::Unregister => "unregister",
        }
    }

    /// The exact bytes written to `status`.
    pub fn line(self, pid: u32) -> String {
        format!("{} {pid}\n", self.letter())
    }
}

/// Why talking to the driver failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The status file does not exist.
    #[error("{}: not found (is the mirrorball driver loaded?)", path.display())]
    DriverAbsent {
        /// The file.
        path: PathBuf,
    },
    /// The status file could not be opened.
    #[error("{}: {error}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// The driver refused the command.
    #[error("cannot {verb} pid {pid}: {reason}")]
    Refused {
        /// `"register"` or `"unregister"`.
        verb: &'static str,
        /// The pid.
        pid: u32,
        /// The driver's errno, explained.
        reason: String,
    },
    /// Reading the list failed.
    #[error("{}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
}

/// What the driver's errno means for a command (see `guest/linux/README.md`, "Interfaces").
pub fn explain(cmd: Command, err: &io::Error) -> String {
    let why = match (err.raw_os_error(), cmd) {
        (Some(libc::ESRCH), _) => "no such process",
        (Some(libc::EEXIST), _) => "already registered",
        (Some(libc::ENOSPC), _) => "the driver's task table is full",
        (Some(libc::ENOENT), Command::Unregister) => "not registered",
        (Some(libc::EPERM), _) | (Some(libc::EACCES), _) => {
            "permission denied (needs CAP_SYS_PTRACE or the same uid)"
        }
        (Some(libc::EINVAL), _) => "invalid (a kernel thread, or a pid the driver cannot parse)",
        _ => return err.to_string(),
    };
    why.to_owned()
}

fn open_error(path: &Path, error: io::Error) -> ProcError {
    if error.kind() == io::ErrorKind::NotFound {
        ProcError::DriverAbsent {
            path: path.to_path_buf(),
        }
    } else {
        ProcError::Open {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Sends `cmd` for `pid` to the status file at `status`: one `write(2)` of the whole line.
///
/// The file is opened for appending, without creating it, so a missing driver is reported as
/// [`ProcError::DriverAbsent`]. (The driver ignores the file offset; a plain file standing in
/// for it in tests collects one line per command.)
pub fn send(status: &Path, cmd: Command, pid: u32) -> Result<(), ProcError> {
    let mut file = OpenOptions::new()
        .append(true)
        .open(status)
        .map_err(|e| open_error(status, e))?;
    let line = cmd.line(pid);
    let refused = |reason: String| ProcError::Refused {
        verb: cmd.verb(),
        pid,
        reason,
    };
    match file.write(line.as_bytes()) {
        Ok(n) if n == line.len() => Ok(()),
        Ok(n) => Err(refused(format!(
            "short write ({n} of {} bytes)",
            line.len()
        ))),
        Err(e) => Err(refused(explain(cmd, &e))),
    }
}

/// Reads the status file: one line per registered task, `<pid> <task_id> process|thread <comm>`.
pub fn read_status(status: &Path) -> Result<String, ProcError> {
    let file = std::fs::File::open(status).map_err(|e| open_error(status, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_STATUS_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|error| ProcError::Read {
            path: status.to_path_buf(),
            error,
        })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_reasons() {
        assert_eq!(Command::Register.line(123), "R 123\n");
        assert_eq!(Command::Unregister.line(7), "U 7\n");
        let e = io::Error::from_raw_os_error(libc::ESRCH);
        assert_eq!(explain(Command::Register, &e), "no such process");
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(explain(Command::Unregister, &e), "not registered");
    }

    #[test]
    fn explicit_dir_wins() {
        assert_eq!(proc_dir(Some(Path::new("/tmp/x"))), PathBuf::from("/tmp/x"));
        assert_eq!(
            status_path(Path::new("/proc/mirrorball")),
            PathBuf::from("/proc/mirrorball/status")
        );
    }

    #[test]
    fn missing_file_means_driver_absent() {
        let err = send(Path::new("/nonexistent/mb/status"), Command::Register, 1);
        assert!(
            matches!(err, Err(ProcError::DriverAbsent { .. })),
            "{err:?}"
        );
    }
}
