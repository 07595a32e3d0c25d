//! Writing reports.
//!
//! Owns [`write_json`]: pretty JSON with a trailing newline, to a file or to stdout.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use serde::Serialize;

use crate::Error;

/// Writes `value` as pretty JSON plus a newline to `path_or_dash`; `"-"` means stdout. A file is
/// created or truncated.
pub fn write_json(path_or_dash: &str, value: &impl Serialize) -> Result<(), Error> {
    if path_or_dash == "-" {
        let stdout = io::stdout();
        let mut lock = stdout.lock();
        write_to(&mut lock, value)
    } else {
        let file = File::create(path_or_dash).map_err(|e| Error::io("create report file", e))?;
        let mut w = BufWriter::new(file);
        write_to(&mut w, value)?;
        w.into_inner()
            .map_err(|e| Error::io("flush report file", e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io("sync report file", e))
    }
}

/// Writes `value` as pretty JSON plus a newline to `w` and flushes it.
pub fn write_to(w: &mut impl Write, value: &impl Serialize) -> Result<(), Error> {
    serde_json::to_writer_pretty(&mut *w, value)?;
    w.write_all(b"\n")
        .and_then(|()| w.flush())
        .map_err(|e| Error::io("write report", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn writes_pretty_json_with_newline_to_a_file() {
        let path =
            std::env::temp_dir().join(format!("mb-profiler-report-{}.json", std::process::id()));
        let path_str = path.to_str().unwrap();
        let value: BTreeMap<&str, u64> = [("exits", 3), ("pf_taken", 7)].into_iter().collect();
        write_json(path_str, &value).unwrap();
        // Overwrites (truncates) an existing file.
        write_json(path_str, &value).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text, "{\n  \"exits\": 3,\n  \"pf_taken\": 7\n}\n");
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let err = write_json("/nonexistent-dir/x.json", &1u32).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Io {
                    what: "create report file",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn write_to_buffer() {
        let mut buf = Vec::new();
        write_to(&mut buf, &[1, 2]).unwrap();
        assert_eq!(buf, b"[\n  1,\n  2\n]\n");
    }
}
