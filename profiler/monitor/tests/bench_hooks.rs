//! The entry points the benchmarks use: [`Fleet::poll_observe`] (what a poll read, before the
//! model ingests it) and [`top::run_headless`] (the dashboard's refresh loop without a terminal).
mod common;

use std::time::Duration;

use common::{temp_dir, Synthetic};
use mirrorball_monitor::fleet::Fleet;
use mirrorball_monitor::top::{self, TopOptions};
use mirrorball_monitor::ModelConfig;

#[test]
fn poll_observe_sees_each_batch_the_model_ingests() {
    let dir = temp_dir("observe");
    let mut a = Synthetic::new(&dir, 0, 2, 3);
    let mut fleet = Fleet::new(&dir, ModelConfig::default());
    fleet.refresh();
    for _ in 0..4 {
        a.step();
    }
    let mut seen = Vec::new();
    fleet.poll_observe(|id, batch| seen.push((id, batch.guest.len(), batch.host.len())));
    assert_eq!(seen, vec![(a.vm.id(), 4 * 3, 4 * 2)]);
    let vm = &fleet.model.vms[&a.vm.id()];
    assert_eq!((vm.guest_samples, vm.host_samples), (12, 8));
    // Nothing new: an empty batch, and the model is unchanged.
    seen.clear();
    fleet.poll_observe(|id, batch| seen.push((id, batch.guest.len(), batch.host.len())));
    assert_eq!(seen, vec![(a.vm.id(), 0, 0)]);
    // `poll` is the same without an observer.
    a.step();
    fleet.poll();
    assert_eq!(fleet.model.vms[&a.vm.id()].guest_samples, 15);
}

#[test]
fn headless_dashboard_refreshes_and_draws_every_interval() {
    let dir = temp_dir("headless");
    let mut a = Synthetic::new(&dir, 0, 1, 1);
    a.step();
    let opts = TopOptions {
        run_dir: dir.clone(),
        interval: Duration::from_millis(50),
    };
    let mut out = Vec::new();
    let report = top::run_headless(&opts, 120, 30, Duration::from_millis(240), &mut out)
        .expect("headless run");
    // Refreshes at 0, 50, ..., 200 ms: 5, give or take a late wake-up.
    assert!((3..=5).contains(&report.frames), "{report:?}");
    assert_eq!(report.bytes, out.len() as u64);
    assert_eq!((report.vms, report.samples), (1, 2));
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("mirrorball top"), "{text}");
    assert!(text.contains("synthetic-0"), "{text}");
    // The interval is clamped like `vmm top`'s: a 1 ms interval still refreshes every 50 ms.
    let fast = TopOptions {
        run_dir: dir,
        interval: Duration::from_millis(1),
    };
    let report = top::run_headless(&fast, 80, 24, Duration::from_millis(120), std::io::sink())
        .expect("headless run");
    assert!((1..=3).contains(&report.frames), "{report:?}");
}
