//! `record` → `plot` round trip on synthetic regions.
mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{temp_dir, Synthetic};
use mirrorball_monitor::plot::{self, FontChoice, ImageFormat, PlotOptions};
use mirrorball_monitor::record::{self, Format, RecordOptions, Row};

fn record_opts(dir: &std::path::Path, out: PathBuf, format: Format) -> RecordOptions {
    RecordOptions {
        run_dir: dir.to_path_buf(),
        vm: None,
        format,
        output: Some(out),
        duration: None,
        poll_interval: Duration::from_millis(5),
        wait: None,
    }
}

#[test]
fn a_recorder_started_first_waits_for_the_vm() {
    let dir = temp_dir("wait");
    let run = dir.join("run");
    let out = dir.join("rec.csv");
    let stop = AtomicBool::new(false);
    // Without --wait, no VM is an error at once.
    let now = record::record(&record_opts(&run, out.clone(), Format::Csv), &stop);
    assert!(now.is_err_and(|e| e.to_string().contains("no running VM")));
    let opts = RecordOptions {
        wait: Some(Duration::from_secs(30)),
        ..record_opts(&run, out.clone(), Format::Csv)
    };
    let summary = std::thread::scope(|s| {
        let rec = s.spawn(|| record::record(&opts, &stop));
        std::thread::sleep(Duration::from_millis(200));
        let mut vm = Synthetic::new(&run, 0, 1, 1);
        for _ in 0..10 {
            vm.step();
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        vm.vm.unpublish();
        rec.join().expect("recorder thread")
    })
    .expect("the recorder waited for the VM");
    assert!(summary.guest > 0, "{summary}");
    assert!(summary.stopped.contains("VM ended"), "{summary}");
    // A wait that runs out gives the same error as no wait.
    let short = RecordOptions {
        wait: Some(Duration::from_millis(100)),
        ..record_opts(&dir.join("empty"), out, Format::Csv)
    };
    assert!(record::record(&short, &stop).is_err_and(|e| e.to_string().contains("no running VM")));
}

#[test]
fn record_until_the_vm_ends_then_plot() {
    let dir = temp_dir("roundtrip");
    let mut vm = Synthetic::new(&dir.join("run"), 0, 2, 3);
    for _ in 0..40 {
        vm.step();
    }
    let out = dir.join("rec.csv");
    let opts = record_opts(&dir.join("run"), out.clone(), Format::Csv);
    let stop = AtomicBool::new(false);
    let summary = std::thread::scope(|s| {
        let rec = s.spawn(|| record::record(&opts, &stop));
        for _ in 0..40 {
            vm.step();
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(50));
        vm.vm.unpublish();
        rec.join().expect("recorder thread")
    })
    .expect("record");
    assert_eq!((summary.guest, summary.host), (240, 160), "{summary}");
    assert_eq!((summary.lost_guest, summary.lost_host), (0, 0));
    assert!(summary.stopped.contains("VM ended"), "{summary}");

    let rec = record::read_record(&out).expect("read back");
    assert_eq!(rec.bad_lines, 0, "{:?}", rec.first_error);
    let seqs: Vec<u64> = rec.guest().map(|g| g.seq).collect();
    assert_eq!(
        seqs,
        (1..=240).collect::<Vec<_>>(),
        "guest sequence has gaps"
    );
    let first = rec.guest().next().unwrap();
    assert_eq!((first.comm.as_str(), first.min_flt), ("work-0", 100));
    let host: Vec<_> = rec.host().collect();
    assert_eq!(host.len(), 160);
    assert_eq!(host[0].comm, "work-0");
    assert_eq!(host[1].comm, "work-1");
    assert!(!rec.rows.iter().any(|r| matches!(r, Row::Lost(_))));

    let series = plot::accumulated_faults(&rec);
    assert_eq!(series.guest.len(), 3);
    assert_eq!(series.guest[0].label, "work-0 [200]");
    for (i, s) in series.guest.iter().enumerate() {
        let i = i as f64;
        assert_eq!(s.points.len(), 80);
        assert_eq!(s.points[0].1, 0.0);
        assert!(s.points[0].0 >= 0.0);
        // 79 periods of (i + 1) * 100 minor and i major faults.
        assert_eq!(s.points[79].1, 79.0 * ((i + 1.0) * 100.0 + i));
        assert!((s.points[79].0 - s.points[0].0 - 79.0 * 0.05).abs() < 1e-9);
    }
    assert_eq!(series.host.len(), 2);
    assert_eq!(series.host[0].points[79].1, 80.0 * 101.0);
    assert_eq!(series.host[1].points[79].1, 80.0 * 201.0);

    let written = plot::plot(&PlotOptions {
        inputs: vec![out.clone()],
        output: None,
        format: ImageFormat::Both,
        font: FontChoice::Auto,
    })
    .expect("plot");
    assert_eq!(
        written,
        vec![dir.join("rec-faults.png"), dir.join("rec-faults.svg")]
    );
    let png = std::fs::read(&written[0]).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    let svg = std::fs::read_to_string(&written[1]).unwrap();
    assert!(svg.contains("<svg") && svg.contains("polyline"));
    eprintln!("plots: {written:?}");
}

#[test]
fn utilization_over_several_records_and_plots_without_text() {
    let dir = temp_dir("util");
    let mut inputs = Vec::new();
    for (k, tasks) in [1u32, 2, 4].into_iter().enumerate() {
        let run = dir.join(format!("run{k}"));
        let mut vm = Synthetic::new(&run, 0, tasks.min(2), tasks);
        for _ in 0..20 {
            vm.step();
        }
        let out = dir.join(format!("n{tasks}.jsonl"));
        let mut opts = record_opts(&run, out.clone(), Format::Jsonl);
        opts.duration = Some(Duration::from_millis(100));
        let summary = record::record(&opts, &AtomicBool::new(false)).expect("record");
        assert!(summary.stopped.contains("elapsed"), "{summary}");
        let rec = record::read_record(&out).unwrap();
        let meta = rec.meta().expect("jsonl has a meta row");
        assert_eq!(meta.name, format!("synthetic-0"));
        let u = plot::utilization(&rec);
        assert_eq!(u.tasks, tasks as usize);
        assert!((u.guest_cpu - 0.5 * f64::from(tasks)).abs() < 1e-9, "{u:?}");
        assert!(
            (u.vcpu_cpu - 0.75 * f64::from(tasks.min(2))).abs() < 1e-9,
            "{u:?}"
        );
        inputs.push(out);
    }
    for (font, prefix) in [(FontChoice::Auto, "text"), (FontChoice::NoText, "notext")] {
        let written = plot::plot(&PlotOptions {
            inputs: inputs.clone(),
            output: Some(dir.join(prefix)),
            format: ImageFormat::Png,
            font,
        })
        .expect("plot");
        assert_eq!(written.len(), 4, "{written:?}");
        assert!(written.contains(&dir.join(format!("{prefix}-utilization.png"))));
        assert!(written.contains(&dir.join(format!("{prefix}-faults-n4.png"))));
        eprintln!("plots: {written:?}");
    }
    // Bad inputs are errors, not panics.
    std::fs::write(dir.join("empty.csv"), "").unwrap();
    assert!(plot::plot(&PlotOptions {
        inputs: vec![dir.join("empty.csv")],
        ..PlotOptions::default()
    })
    .is_err());
    assert!(plot::plot(&PlotOptions {
        inputs: vec![dir.join("missing.csv")],
        ..PlotOptions::default()
    })
    .is_err());
    assert!(plot::plot(&PlotOptions {
        inputs: inputs.clone(),
        font: FontChoice::File(dir.join("empty.csv")),
        ..PlotOptions::default()
    })
    .is_err());
}
