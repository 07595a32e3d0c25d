//! The control protocol's messages: one JSON object per line each way (see `vmm/CONTROL.md`).
//! Parsing is pure and bounded so that it can be fuzzed: anything a client sends becomes a
//! [`Request`] or a one-line error, never a panic.
use serde::{Deserialize, Serialize};

/// Longest request line accepted, newline excluded; a longer one is answered with an error and
/// skipped up to its newline.
pub const MAX_LINE: usize = 4096;

/// What a client asks a VM to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Report the VM's state.
    Status,
    /// Park every vCPU.
    Pause,
    /// Let parked vCPUs run again.
    Resume,
    /// End the VM.
    Stop,
    /// Pause, write a snapshot into `dir` (created; must not exist or be empty), resume if the
    /// VM was running before.
    Snapshot {
        /// Snapshot directory.
        dir: String,
    },
}

/// One request line: a command and an optional id the reply echoes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// Echoed in the reply (lets a client match replies to pipelined requests).
    pub id: Option<u64>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!("request longer than {MAX_LINE} bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    let mut value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("request is not JSON: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| "request is not a JSON object".to_string())?;
    let id = match object.remove("id") {
        None => None,
        Some(v) => Some(
            serde_json::from_value::<IdOnly>(serde_json::json!({ "id": v }))
                .ok()
                .and_then(|i| i.id)
                .ok_or_else(|| "\"id\" must be a non-negative integer".to_string())?,
        ),
    };
    let allowed: &[&str] = match object.get("cmd").and_then(serde_json::Value::as_str) {
        None => return Err("request has no \"cmd\" string".into()),
        Some("snapshot") => &["cmd", "dir"],
        Some(_) => &["cmd"],
    };
    if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field {extra:?} in the request"));
    }
    let command: Command =
        serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))?;
    if let Command::Snapshot { dir } = &command {
        if dir.is_empty() || dir.contains('\0') {
            return Err("snapshot \"dir\" must be a non-empty path".into());
        }
    }
    Ok(Request { command, id })
}

/// A VM's run state as the protocol names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// A pause was asked for; some vCPUs have not parked yet.
    Pausing,
    /// Every vCPU is parked.
    Paused,
    /// The VM is ending.
    Ending,
}

/// One reply line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The request's id, if it had one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<u64>,
    /// Why it was not (one line).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The VM's name.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// The VM's state after the request.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub state: Option<RunState>,
    /// Seconds since the VM started.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uptime_s: Option<f64>,
    /// vCPUs that have not stopped.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vcpus_running: Option<usize>,
    /// Command-specific figures (e.g. a snapshot's size and pause time).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<serde_json::Value>,
}

impl Reply {
    /// An error reply.
    pub fn error(id: Option<u64>, message: impl Into<String>) -> Self {
        let message: String = message.into();
        Self {
            ok: false,
            id,
            error: Some(message.replace('\n', " ")),
            ..Self::default()
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"cannot encode the reply"}"#.to_vec());
        line.push(b'\n');
        line
    }
}

/// Splits a client's input into lines as they arrive: bounded memory, over-long lines dropped
/// (reported once each).
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
    discarding: bool,
}

/// What [`LineBuffer::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line (newline removed).
    Complete(Vec<u8>),
    /// A line longer than [`MAX_LINE`] (its rest is skipped).
    TooLong,
}

impl LineBuffer {
    /// Adds received bytes; returns the lines they completed.
    pub fn push(&mut self, mut data: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let newline = data.iter().position(|&b| b == b'\n');
            let (chunk, rest, ended) = match newline {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &[][..], false),
            };
            data = rest;
            if !self.discarding {
                if self.pending.len() + chunk.len() > MAX_LINE {
                    self.pending.clear();
                    self.discarding = true;
                    out.push(Line::TooLong);
                } else {
                    self.pending.extend_from_slice(chunk);
                }
            }
            if ended {
                if !self.discarding {
                    let mut line = std::mem::take(&mut self.pending);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if !line.iter().all(u8::is_ascii_whitespace) {
                        out.push(Line::Complete(line));
                    }
                }
                self.discarding = false;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_command() {
        let r = parse_request(br#"{"cmd":"status"}"#).expect("status");
        assert_eq!(r.command, Command::Status);
        let r = parse_request(br#"{"cmd":"snapshot","dir":"/tmp/s","id":7}"#).expect("snap");
        assert_eq!(
            r,
            Request {
                command: Command::Snapshot {
                    dir: "/tmp/s".into()
                },
                id: Some(7)
            }
        );
        for cmd in ["pause", "resume", "stop"] {
            parse_request(format!(r#"{{"cmd":"{cmd}"}}"#).as_bytes()).expect(cmd);
        }
    }

    #[test]
    fn refuses_garbage_with_one_line() {
        for bad in [
            &b"hello"[..],
            b"[]",
            b"{}",
            br#"{"cmd":"reboot"}"#,
            br#"{"cmd":"status","x":1}"#,
            br#"{"cmd":"snapshot"}"#,
            br#"{"cmd":"snapshot","dir":""}"#,
            br#"{"cmd":"status","id":-1}"#,
            b"\xff\xfe",
        ] {
            let e = parse_request(bad).expect_err("must fail");
            assert!(!e.contains('\n'), "{e}");
            let line = Reply::error(None, e).to_line();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        }
    }

    #[test]
    fn splits_lines_and_drops_long_ones() {
        let mut b = LineBuffer::default();
        assert_eq!(b.push(b"{\"cmd\":"), vec![]);
        assert_eq!(
            b.push(b"\"status\"}\r\n\n{"),
            vec![Line::Complete(br#"{"cmd":"status"}"#.to_vec())]
        );
        let long = vec![b'x'; MAX_LINE + 10];
        assert_eq!(b.push(&long), vec![Line::TooLong]);
        assert_eq!(b.push(&long), vec![]);
        assert_eq!(b.push(b"tail\nok\n"), vec![Line::Complete(b"ok".to_vec())]);
    }
}
