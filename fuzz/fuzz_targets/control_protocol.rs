//! The control socket's input side: `LineBuffer` splitting arbitrary bytes (cut into chunks
//! where the input says) into bounded lines, and `parse_request` on each line.
//!
//! Checked: it never panics; no line handed out is longer than `MAX_LINE`; every accepted
//! request has a snapshot directory that is non-empty when it has one; every error and every
//! reply encodes as exactly one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::control::protocol::{parse_request, Command, Line, LineBuffer, Reply, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    let (cut, bytes) = match data.split_first() {
        Some((&c, rest)) => (usize::from(c).max(1), rest),
        None => (1, data),
    };
    let mut buffer = LineBuffer::default();
    for chunk in bytes.chunks(cut) {
        for line in buffer.push(chunk) {
            let Line::Complete(line) = line else {
                continue;
            };
            assert!(line.len() <= MAX_LINE);
            let reply = match parse_request(&line) {
                Ok(request) => {
                    if let Command::Snapshot { dir } = &request.command {
                        assert!(!dir.is_empty());
                    }
                    Reply {
                        ok: true,
                        id: request.id,
                        ..Reply::default()
                    }
                }
                Err(e) => Reply::error(None, e),
            };
            let encoded = reply.to_line();
            assert_eq!(encoded.iter().filter(|&&b| b == b'\n').count(), 1);
        }
    }
});
