//! Task names for display: the `comm` of a sample's task, looked up in the region's task table
//! and made printable.
//!
//! A sample names its task by task id and pid. The table entry at that id is trusted only if it
//! holds the same pid (entries are reused after unregistration), and its `comm` — hostile bytes —
//! is reduced to printable ASCII without spaces, so it can sit in a whitespace-separated column.

use std::collections::BTreeMap;

use mirrorball_profiler_abi::{comm_bytes, Comm, GuestRegionView, TASK_FREE};

/// Most names cached; a guest that keeps inventing (task id, pid) pairs only makes the cache
/// start over.
const MAX_CACHED: usize = 4096;

/// `comm` as a printable word: bytes outside `!`..=`~` become `?`; empty becomes `-`.
pub fn printable_comm(comm: &Comm) -> String {
    let s: String = comm_bytes(comm)
        .iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect();
    if s.is_empty() {
        "-".to_owned()
    } else {
        s
    }
}

/// Remembers the names of the tasks seen, by (task id, pid).
#[derive(Debug, Default)]
pub struct Names {
    known: BTreeMap<(u32, u32), String>,
}

impl Names {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The name of task `task_id` with pid `pid`: cached, else read from the table now (an entry
    /// that is busy, free or holds another pid gives `?`, and is retried next time).
    pub fn get(&mut self, view: &GuestRegionView<'_>, task_id: u32, pid: u32) -> String {
        if let Some(name) = self.known.get(&(task_id, pid)) {
            return name.clone();
        }
        match view.task(task_id) {
            Ok(info) if info.pid == pid && info.state != TASK_FREE => {
                let name = printable_comm(&info.comm);
                if self.known.len() >= MAX_CACHED {
                    self.known.clear();
                }
                self.known.insert((task_id, pid), name.clone());
                name
            }
            _ => "?".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorball_profiler_abi::comm_from;

    #[test]
    fn hostile_names_are_printable() {
        assert_eq!(printable_comm(&comm_from(b"work")), "work");
        assert_eq!(printable_comm(&comm_from(b"a b\x1b[2J")), "a?b?[2J");
        assert_eq!(printable_comm(&[0; 16]), "-");
        assert_eq!(printable_comm(&[0xff; 16]), "?".repeat(16));
    }
}
