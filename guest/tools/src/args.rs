//! Command-line plumbing shared by the three tools: the usage error type (exit status 2), an
//! argument cursor, and number parsers that name the offending argument.
//!
//! Hand-written instead of `clap` to keep the static binaries small for the initramfs.

use std::ffi::OsString;
use std::time::Duration;

/// Exit status for a usage error (bad arguments), as in most Unix tools.
pub const EXIT_USAGE: u8 = 2;

/// A bad command line. Binaries print it as one line and exit with [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    /// An argument that is not valid UTF-8.
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(OsString),
    /// An option this tool does not know.
    #[error("unknown option {0}")]
    UnknownOption(String),
    /// An option that needs a value came last.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// A value that does not parse or is out of range.
    #[error("bad {what} {value:?}: {why}")]
    BadValue {
        /// What the value is (e.g. "memory size").
        what: &'static str,
        /// The text given.
        value: String,
        /// Why it was rejected.
        why: String,
    },
    /// Wrong number of positional arguments, or a missing command.
    #[error("{0}")]
    Arity(String),
}

impl UsageError {
    /// A [`UsageError::BadValue`].
    pub fn bad(what: &'static str, value: &str, why: impl Into<String>) -> Self {
        Self::BadValue {
            what,
            value: value.to_owned(),
            why: why.into(),
        }
    }
}

/// The arguments after the program name, as UTF-8 strings.
pub fn collect(args: impl IntoIterator<Item = OsString>) -> Result<Vec<String>, UsageError> {
    args.into_iter()
        .map(|a| a.into_string().map_err(UsageError::NotUtf8))
        .collect()
}

/// Walks a list of arguments: options (`--name` or `--name VALUE`) and positionals.
#[derive(Debug)]
pub struct Cursor {
    args: std::vec::IntoIter<String>,
}

impl Cursor {
    /// A cursor over `args` (without the program name).
    pub fn new(args: Vec<String>) -> Self {
        Self {
            args: args.into_iter(),
        }
    }

    /// The next argument, if any.
    pub fn next_arg(&mut self) -> Option<String> {
        self.args.next()
    }

    /// The value of option `name`, which must follow it.
    pub fn value(&mut self, name: &str) -> Result<String, UsageError> {
        self.args
            .next()
            .ok_or_else(|| UsageError::MissingValue(name.to_owned()))
    }
}

/// True if `arg` looks like an option (`-x`, `--xyz`) rather than a value; a lone `-` is a value.
pub fn is_option(arg: &str) -> bool {
    arg.starts_with('-') && arg.len() > 1
}

/// Parses an unsigned decimal integer in `min..=max`.
pub fn parse_u64(what: &'static str, text: &str, min: u64, max: u64) -> Result<u64, UsageError> {
    let value: u64 = text
        .parse()
        .map_err(|_| UsageError::bad(what, text, "not a non-negative integer"))?;
    if value < min || value > max {
        return Err(UsageError::bad(
            what,
            text,
            format!("must be in {min}..={max}"),
        ));
    }
    Ok(value)
}

/// Parses a process id: a decimal integer in `1..=i32::MAX` (what the kernel's `kstrtoint`
/// accepts as a positive pid).
pub fn parse_pid(text: &str) -> Result<u32, UsageError> {
    let pid = parse_u64("pid", text, 1, i32::MAX as u64)?;
    u32::try_from(pid).map_err(|_| UsageError::bad("pid", text, "too large"))
}

/// Parses a duration in seconds, with an optional fraction (`2`, `0.25`); at most one day.
pub fn parse_seconds(what: &'static str, text: &str) -> Result<Duration, UsageError> {
    let secs: f64 = text
        .parse()
        .map_err(|_| UsageError::bad(what, text, "not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(UsageError::bad(what, text, "must be in 0..=86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_pids() {
        assert_eq!(parse_u64("n", "42", 1, 100), Ok(42));
        assert!(parse_u64("n", "0", 1, 100).is_err());
        assert!(parse_u64("n", "101", 1, 100).is_err());
        assert!(parse_u64("n", "-1", 0, 100).is_err());
        assert!(parse_u64("n", "", 0, 100).is_err());
        assert_eq!(parse_pid("123"), Ok(123));
        assert!(parse_pid("0").is_err());
        assert!(parse_pid("abc").is_err());
        assert!(parse_pid("2147483648").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("d", "0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("d", "3"), Ok(Duration::from_secs(3)));
        for bad in ["-1", "nan", "inf", "x", "1e9"] {
            assert!(parse_seconds("d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options() {
        assert!(is_option("--csv"));
        assert!(is_option("-h"));
        assert!(!is_option("-"));
        assert!(!is_option("12"));
        let mut c = Cursor::new(vec!["--x".into()]);
        assert_eq!(c.next_arg().as_deref(), Some("--x"));
        assert_eq!(
            c.value("--x"),
            Err(UsageError::MissingValue("--x".to_owned()))
        );
    }
}
