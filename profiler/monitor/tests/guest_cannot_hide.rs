//! Issue 8 §5: a guest that breaks its own region hides none of the host's figures (prometheus,
//! record, top all keep the VM, with a warning and a metric), and a guest that scribbles over its
//! ring cannot make `record` write a row per ring slot.
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{temp_dir, Synthetic};
use mirrorball_monitor::fleet::Fleet;
use mirrorball_monitor::record::{self, batch_rows, CommCache, Format, RecordOptions, Row};
use mirrorball_monitor::{Batch, Loss, ModelConfig, Ring, VmHandle};

fn break_guest_magic(vm: &Synthetic) {
    let raw = vm.vm.guest_raw().expect("raw").as_region();
    // SAFETY: the mapping lives as long as `vm`; 8-aligned; written only through an atomic.
    let word = unsafe { &*raw.as_ptr().cast::<AtomicU64>() };
    word.store(0, Ordering::SeqCst);
}

#[test]
fn a_broken_guest_header_is_a_metric_and_a_warning_not_a_disappearance() {
    let dir = temp_dir("hide");
    let mut vm = Synthetic::new(&dir, 0, 2, 2);
    for _ in 0..5 {
        vm.step();
    }
    break_guest_magic(&vm);
    let id = vm.vm.id();

    let mut fleet = Fleet::new(&dir, ModelConfig::default());
    fleet.tick();
    assert!(fleet.vm(id).is_some(), "the VM is still watched");
    assert!(fleet.errors.is_empty(), "{:?}", fleet.errors);
    let warnings = fleet.take_warnings();
    assert!(
        warnings.len() == 1 && warnings[0].contains("guest region invalid"),
        "{warnings:?}"
    );
    let text = mirrorball_monitor::prometheus::render(&fleet);
    assert!(
        text.contains(&format!(
            "mirrorball_vm_guest_region_valid{{vm=\"{id}\"}} 0"
        )),
        "{text}"
    );
    let host_samples = format!("mirrorball_vm_samples_total{{vm=\"{id}\",ring=\"host\"}} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&host_samples))
        .expect("host samples exported");
    let n: f64 = line[host_samples.len()..].parse().expect("number");
    assert!(n >= 10.0, "{line}");

    let out = dir.join("rec.csv");
    let summary = record::record(
        &RecordOptions {
            run_dir: dir.clone(),
            vm: Some(id),
            format: Format::Csv,
            output: Some(out),
            duration: Some(Duration::from_millis(100)),
            poll_interval: Duration::from_millis(10),
            wait: None,
        },
        &AtomicBool::new(false),
    )
    .expect("record keeps the VM");
    assert!(summary.host >= 10, "{summary}");
    assert!(
        summary.to_string().contains("guest region invalid"),
        "{summary}"
    );
}

#[test]
fn scattered_losses_make_one_lost_row_per_ring_and_poll() {
    let dir = temp_dir("flood");
    let vm = Synthetic::new(&dir, 0, 1, 1);
    let open = VmHandle::new(&dir, vm.vm.id()).open().expect("open");
    let losses: Vec<Loss> = (0..10_000u64)
        .map(|i| Loss {
            ring: if i % 2 == 0 { Ring::Guest } else { Ring::Host },
            first: i * 2,
            count: 1,
        })
        .collect();
    let batch = Batch {
        losses,
        lost_guest: 5000,
        lost_host: 5000,
        ..Batch::default()
    };
    let rows = batch_rows(&open, &batch, &mut CommCache::default());
    let lost: Vec<_> = rows
        .iter()
        .filter_map(|r| match r {
            Row::Lost(l) => Some((l.ring.clone(), l.seq, l.count)),
            _ => None,
        })
        .collect();
    assert_eq!(
        lost,
        vec![
            ("guest".to_string(), 0, 5000),
            ("host".to_string(), 2, 5000)
        ]
    );
}
