//! The `register` tool's command line: `register [--proc DIR] R <pid>...`, `U <pid>...` or
//! `list`. Running it is a loop over [`crate::procfs::send`] in the binary.

use std::path::PathBuf;

use crate::args::{self, Cursor, UsageError};
use crate::procfs::Command;

/// Usage text.
pub const USAGE: &str = "usage: register [--proc DIR] R <pid>... | U <pid>... | list";

/// What `register` should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `R`/`U` for each pid, in order.
    Send(Command, Vec<u32>),
    /// Print the registered list.
    List,
    /// Print [`USAGE`].
    Help,
}

/// A parsed `register` command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterArgs {
    /// The driver's procfs directory (`--proc`), else the default/environment.
    pub proc_dir: Option<PathBuf>,
    /// The action.
    pub action: Action,
}

/// Parses the arguments after the program name. Every pid is checked before anything is sent.
pub fn parse(args: Vec<String>) -> Result<RegisterArgs, UsageError> {
    let mut cur = Cursor::new(args);
    let mut proc_dir = None;
    let mut words = Vec::new();
    while let Some(arg) = cur.next_arg() {
        match arg.as_str() {
            "-h" | "--help" => {
                return Ok(RegisterArgs {
                    proc_dir,
                    action: Action::Help,
                })
            }
            "--proc" => proc_dir = Some(PathBuf::from(cur.value(&arg)?)),
            a if args::is_option(a) => return Err(UsageError::UnknownOption(arg)),
            _ => words.push(arg),
        }
    }
    let Some((first, rest)) = words.split_first() else {
        return Err(UsageError::Arity(format!("missing command; {USAGE}")));
    };
    let cmd = match first.as_str() {
        "R" | "r" => Command::Register,
        "U" | "u" => Command::Unregister,
        "list" | "l" => {
            if !rest.is_empty() {
                return Err(UsageError::Arity("list takes no arguments".to_owned()));
            }
            return Ok(RegisterArgs {
                proc_dir,
                action: Action::List,
            });
        }
        other => return Err(UsageError::bad("command", other, "must be R, U or list")),
    };
    if rest.is_empty() {
        return Err(UsageError::Arity(format!(
            "{} needs at least one pid; {USAGE}",
            cmd.letter()
        )));
    }
    let pids = rest
        .iter()
        .map(|p| args::parse_pid(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RegisterArgs {
        proc_dir,
        action: Action::Send(cmd, pids),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse(argv("R 1 2")).map(|a| a.action),
            Ok(Action::Send(Command::Register, vec![1, 2]))
        );
        let a = parse(argv("--proc /x U 9")).unwrap();
        assert_eq!(a.proc_dir, Some(PathBuf::from("/x")));
        assert_eq!(a.action, Action::Send(Command::Unregister, vec![9]));
        assert_eq!(parse(argv("list")).map(|a| a.action), Ok(Action::List));
    }

    #[test]
    fn bad_command_lines() {
        for bad in [
            "", "R", "R abc", "R 1 x", "X 1", "list 3", "R 0", "R -5", "--proc",
        ] {
            assert!(parse(argv(bad)).is_err(), "{bad:?}");
        }
    }
}
