//! One host clock for both panels of the faults plot.
//!
//! Host samples carry the host's `CLOCK_MONOTONIC`; guest samples carry the guest's own clock
//! (a Linux guest's `CLOCK_MONOTONIC`, which starts at its boot). Every record row also carries
//! `read_ns`, the recorder's host `CLOCK_MONOTONIC` when it read the sample, always after the
//! guest wrote it. So `read_ns - timestamp_ns` over a record's guest samples is the guest-to-host
//! clock offset plus each sample's reading delay, and its minimum is the best estimate of the
//! offset (too late by the smallest delay seen, at most one recorder poll). [`Timeline`] maps
//! guest times onto the host clock with it and starts both axes at the record's first moment
//! (the first host interval's start, or the first guest sample, whichever is earlier).
//!
//! A record without `read_ns` (all zero) gives no offset: each panel then keeps its own origin
//! ([`Timeline::shared`] is false).

use crate::record::Recording;

/// Where the x axes of a record's faults plot start and how guest times map onto them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeline {
    /// Host time minus guest time, when the record allows estimating it.
    guest_to_host: Option<i128>,
    /// Origin of the host axis (host ns).
    host_origin: i128,
    /// Origin of the guest axis (host ns when shared, else guest ns).
    guest_origin: i128,
}

impl Timeline {
    /// The timeline of `rec`.
    pub fn of(rec: &Recording) -> Self {
        let guest_to_host = rec
            .guest()
            .filter(|g| g.read_ns != 0)
            .map(|g| i128::from(g.read_ns) - i128::from(g.timestamp_ns))
            .min();
        let host_first = rec
            .host()
            .map(|h| i128::from(h.timestamp_ns) - i128::from(h.interval_ns))
            .min();
        let guest_first = rec.guest().map(|g| i128::from(g.timestamp_ns)).min();
        match guest_to_host {
            Some(off) => {
                let first = [host_first, guest_first.map(|g| g + off)]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(0);
                Self {
                    guest_to_host,
                    host_origin: first,
                    guest_origin: first - off,
                }
            }
            None => Self {
                guest_to_host: None,
                host_origin: rec
                    .host()
                    .map(|h| i128::from(h.timestamp_ns))
                    .min()
                    .unwrap_or(0),
                guest_origin: guest_first.unwrap_or(0),
            },
        }
    }

    /// Whether both panels share the host clock and origin.
    pub fn shared(&self) -> bool {
        self.guest_to_host.is_some()
    }

    /// Seconds on the guest panel's axis of a guest sample taken at `timestamp_ns`.
    pub fn guest_x(&self, timestamp_ns: u64) -> f64 {
        seconds(i128::from(timestamp_ns) - self.guest_origin)
    }

    /// Seconds on the host panel's axis of a host sample ending at `timestamp_ns`.
    pub fn host_x(&self, timestamp_ns: u64) -> f64 {
        seconds(i128::from(timestamp_ns) - self.host_origin)
    }
}

fn seconds(ns: i128) -> f64 {
    ns.max(0) as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{GuestRow, HostRow, Row};

    fn guest(ts: u64, read: u64) -> Row {
        Row::Guest(GuestRow {
            timestamp_ns: ts,
            read_ns: read,
            ..Default::default()
        })
    }

    fn host(ts: u64, interval: u64) -> Row {
        Row::Host(HostRow {
            timestamp_ns: ts,
            interval_ns: interval,
            ..Default::default()
        })
    }

    /// A guest whose clock is 1,000 s behind the host's: samples at guest 5 s and 6 s, read 3 ms
    /// and 1 ms later; host intervals of 0.5 s ending at host 1,005.5 and 1,006 s.
    #[test]
    fn guest_samples_land_on_the_host_clock() {
        const S: u64 = 1_000_000_000;
        let rec = Recording {
            rows: vec![
                guest(5 * S, 1005 * S + 3_000_000),
                host(1005 * S + S / 2, S / 2),
                guest(6 * S, 1006 * S + 1_000_000),
                host(1006 * S, S / 2),
            ],
            ..Default::default()
        };
        let t = Timeline::of(&rec);
        assert!(t.shared());
        // Origin: the first host interval's start, host 1,005 s.
        assert!((t.host_x(1005 * S + S / 2) - 0.5).abs() < 1e-9);
        assert!((t.host_x(1006 * S) - 1.0).abs() < 1e-9);
        // Offset = smallest read delay: 1,000 s + 1 ms. Guest 6 s = host 1,006.001 s.
        assert!((t.guest_x(6 * S) - 1.001).abs() < 1e-9);
        assert!((t.guest_x(5 * S) - 0.001).abs() < 1e-9);
    }

    #[test]
    fn without_read_times_each_panel_keeps_its_origin() {
        let rec = Recording {
            rows: vec![
                guest(50, 0),
                guest(2_000_000_050, 0),
                host(7_000_000_000, 10),
            ],
            ..Default::default()
        };
        let t = Timeline::of(&rec);
        assert!(!t.shared());
        assert_eq!(t.guest_x(50), 0.0);
        assert!((t.guest_x(2_000_000_050) - 2.0).abs() < 1e-9);
        assert_eq!(t.host_x(7_000_000_000), 0.0);
        assert_eq!(Timeline::of(&Recording::default()).host_x(0), 0.0);
    }
}
