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
    /// A log file, created (it must not exist: `O_EXCL`, no symlink followed), mode 0600.
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
            Self::File(path) => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|source| BuildError::Console {
                        path: path.clone(),
                        source,
                    })?;
                Box::new(std::io::LineWriter::new(file))
            }
        };
        let (buffer, drain) = buffered_console(out, DEFAULT_CONSOLE_BUFFER)
            .map_err(|e| BuildError::Boot(format!("cannot start the console thread: {e}")))?;
        Ok((Box::new(buffer), Some(drain)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_file_is_created_private_and_never_reused() {
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
        assert!(sink.open().is_err(), "an existing file is not overwritten");
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(dir.join("elsewhere"), &link).expect("symlink");
        assert!(
            ConsoleSink::File(link).open().is_err(),
            "no symlink is followed"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
