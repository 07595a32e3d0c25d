//! Where a VM's serial console goes: the terminal, a log file of its own, or nowhere. Output to
//! the terminal or a file goes through a bounded buffer drained by a thread of its own, so a
//! sink that does not take it (a pipe nobody reads) never blocks a vCPU.
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use mirrorball_devices::serial::{
    buffered_console, ConsoleDrain, SerialWriter, DEFAULT_CONSOLE_BUFFER,
};

use super::BuildError;

/// A VM's console sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleSink {
    /// The VMM's standard output (one VM at a time: the interactive console).
    Stdout,
    /// A log file, mode 0600. It is created under a fresh name (`O_EXCL`, no symlink followed)
    /// and then renamed into place, so it replaces the log of an earlier run (a symlink left
    /// at its path is replaced, never followed).
    File(PathBuf),
    /// Discarded.
    Null,
}

impl ConsoleSink {
    /// Opens the sink for the serial device: the writer, and the thread that drains it.
    pub fn open(&self) -> Result<(SerialWriter, Option<ConsoleDrain>), BuildError> {
        let out: SerialWriter = match self {
            Self::Stdout => Box::new(std::io::stdout()),
            Self::Null => return Ok((Box::new(std::io::sink()), None)),
            Self::File(path) => Box::new(std::io::LineWriter::new(create_log(path)?)),
        };
        let (buffer, drain) = buffered_console(out, DEFAULT_CONSOLE_BUFFER)
            .map_err(|e| BuildError::Boot(format!("cannot start the console thread: {e}")))?;
        Ok((Box::new(buffer), Some(drain)))
    }
}

/// Creates `path` afresh: a new private file beside it, renamed over it.
fn create_log(path: &std::path::Path) -> Result<std::fs::File, BuildError> {
    let err = |source| BuildError::Console {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    let mut fresh = name.to_os_string();
    fresh.push(format!(".new-{}", std::process::id()));
    let fresh = path.with_file_name(fresh);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&fresh)
        .map_err(err)?;
    if let Err(e) = std::fs::rename(&fresh, path) {
        let _ = std::fs::remove_file(&fresh);
        return Err(err(e));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_file_is_created_private_and_replaces_an_earlier_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mb-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vm0.log");
        let sink = ConsoleSink::File(path.clone());
        let (mut w, drain) = sink.open().expect("open");
        w.write_all(b"hello\n").expect("write");
        drop(w);
        drain
            .expect("a drain")
            .finish(std::time::Duration::from_secs(1));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "hello\n");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second run replaces the log: a new file, nothing of the old one left.
        let (mut w, drain) = sink.open().expect("a second run");
        w.write_all(b"again\n").expect("write");
        drop(w);
        drain
            .expect("a drain")
            .finish(std::time::Duration::from_secs(1));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "again\n");
        // A symlink at the path is replaced, its target never written.
        let link = dir.join("link.log");
        let target = dir.join("elsewhere");
        std::fs::write(&target, "keep").expect("target");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let (w, drain) = ConsoleSink::File(link.clone())
            .open()
            .expect("open over a link");
        drop(w);
        drain
            .expect("a drain")
            .finish(std::time::Duration::from_secs(1));
        assert!(!std::fs::symlink_metadata(&link).expect("meta").is_symlink());
        assert_eq!(std::fs::read_to_string(&target).expect("target"), "keep");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".new-")), "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
