//! Files a user names on the command line (inputs to read, outputs to write), opened so that the
//! work done before any check is bounded: nothing blocks on a FIFO, nothing reads a device or a
//! file larger than a limit, and anything that is not a regular file is refused with one line.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

fn not_regular(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{}: not a regular file (a FIFO, device or directory is refused)",
            path.display()
        ),
    )
}

fn clear_nonblock(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: reads and updates the status flags of a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// Opens `path` for reading: a regular file of at most `max_bytes`. Errors name the path.
pub fn open_input(path: &Path, max_bytes: u64) -> io::Result<File> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(with_path)?;
    let meta = file.metadata().map_err(with_path)?;
    if !meta.is_file() {
        return Err(not_regular(path));
    }
    if meta.len() > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: {} bytes, more than the {max_bytes} this reads",
                path.display(),
                meta.len()
            ),
        ));
    }
    clear_nonblock(&file);
    Ok(file)
}

/// Creates or truncates `path` for writing, refusing anything but a regular file (a FIFO nobody
/// reads would block the open or the writes). Errors name the path.
pub fn create_output(path: &Path) -> io::Result<File> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(not_regular(path));
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(with_path)?;
    if !file.metadata().map_err(with_path)?.is_file() {
        return Err(not_regular(path));
    }
    clear_nonblock(&file);
    file.set_len(0).map_err(with_path)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_big_files_are_refused_at_once() {
        let dir = std::env::temp_dir().join(format!("mb-userfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
        // SAFETY: creates a FIFO at a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for p in [fifo.as_path(), Path::new("/dev/zero"), dir.as_path()] {
            let e = open_input(p, 1 << 20).expect_err("refused").to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        let e = create_output(&fifo).expect_err("refused").to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 100]).expect("write");
        assert!(open_input(&big, 99).is_err());
        assert!(open_input(&big, 100).is_ok());
        let out = dir.join("out");
        std::fs::write(&out, b"old contents").expect("write");
        create_output(&out).expect("create");
        assert_eq!(std::fs::read(&out).expect("read"), b"");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
