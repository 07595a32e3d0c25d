//! `monitor`: regions written with the ABI crate's guest-side writer, read by the library loop and
//! by the binary on a plain file (`--device FILE`); lost records are counted, never printed;
//! garbage gives one line and a non-zero exit.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use mirrorball_guest_tools::monitor::{self, RunOptions};
use mirrorball_guest_tools::sink::csv::{CsvSink, HEADER};
use mirrorball_guest_tools::walker::{Counts, Step, Walker};
use mirrorball_profiler_abi::*;

const MONITOR: &str = env!("CARGO_BIN_EXE_monitor");

fn once() -> RunOptions {
    RunOptions {
        duration: Some(Duration::ZERO),
        interval: Duration::from_secs(1),
        poll: Duration::from_millis(1),
        from_head: false,
    }
}

/// Two tasks, three ticks each, interleaved as the sampler writes them.
fn two_tasks(r: &TestRegion) -> Vec<(GuestSample, u64)> {
    let a = r.register(101, b"work");
    let b = r.register(202, b"work-l");
    let samples: Vec<GuestSample> = (1..=3)
        .flat_map(|n| [sample(a, 101, n), sample(b, 202, n * 2)])
        .collect();
    let seqs = r.push(&samples);
    samples.into_iter().zip(seqs).collect()
}

#[test]
fn library_loop_writes_one_row_per_record() {
    let r = TestRegion::new(2, 8, 16);
    let expected = two_tasks(&r);
    let view = validate_guest_region(r.region()).unwrap();
    let mut sink = CsvSink::new(Vec::new());
    let summary = monitor::run(&view, &mut sink, &once(), &|| false, &|| Ok(())).unwrap();
    let text = String::from_utf8(sink.into_inner()).unwrap();
    let mut want = vec![HEADER.to_owned()];
    want.extend(expected.iter().map(|(s, seq)| csv_row(s, *seq)));
    assert_eq!(text.lines().collect::<Vec<_>>(), want);
    assert_eq!(summary.counts.read, 6);
    assert_eq!(summary.counts.lost(), 0);
    assert!(
        summary.line().contains("6 records, 0 lost"),
        "{}",
        summary.line()
    );
}

#[test]
fn binary_prints_csv_rows_of_a_region_file() {
    let dir = Scratch::new("csv");
    let r = TestRegion::new(2, 8, 16);
    let expected = two_tasks(&r);
    let file = dir.path("region");
    r.save(&file);
    let out = run(
        MONITOR,
        &[
            "--device",
            file.to_str().unwrap(),
            "--csv",
            "-",
            "--duration",
            "0.05",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut want = vec![HEADER.to_owned()];
    want.extend(expected.iter().map(|(s, seq)| csv_row(s, *seq)));
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), want);
    assert!(
        stderr(&out).contains("6 records, 0 lost (overwritten 0, torn 0, stale 0)"),
        "{}",
        stderr(&out)
    );

    // The same rows into a file.
    let csv = dir.path("out.csv");
    let out = run(
        MONITOR,
        &[
            "--device",
            file.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
            "--duration",
            "0",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let written = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(written.lines().collect::<Vec<_>>(), want);
}

#[test]
fn record_being_overwritten_is_counted_not_printed() {
    let dir = Scratch::new("overwritten");
    // Capacity 8, 10 records: the ring holds 3..=10. The writer has started record 11, which
    // goes into record 3's slot: the slot's sequence is `SEQ_WRITING | 11`.
    let r = TestRegion::new(1, 4, 8);
    let id = r.register(7, b"work");
    let samples: Vec<GuestSample> = (1..=10).map(|n| sample(id, 7, n)).collect();
    let seqs = r.push(&samples);
    r.poke(r.slot_offset(3), SEQ_WRITING | 11);
    // And record 6's slot holds a stale sequence (a writer that broke the protocol).
    r.poke(r.slot_offset(6), 0);
    let file = dir.path("region");
    r.save(&file);
    let out = run(
        MONITOR,
        &[
            "--device",
            file.to_str().unwrap(),
            "--csv",
            "-",
            "--duration",
            "0",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<String> = stdout(&out).lines().skip(1).map(str::to_owned).collect();
    let want: Vec<String> = samples
        .iter()
        .zip(&seqs)
        .filter(|(_, &seq)| seq >= 4 && seq != 6)
        .map(|(s, &seq)| csv_row(s, seq))
        .collect();
    assert_eq!(rows, want);
    assert!(
        stderr(&out).contains("6 records, 2 lost (overwritten 1, torn 0, stale 1)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn walker_accounts_for_every_record_under_a_racing_writer() {
    // A writer laps a small ring as fast as it can; every record the walker accepts must be the
    // one its sequence number says (fields derived from it), and read + lost must account for
    // every sequence number passed.
    let r = TestRegion::new(1, 1, 16);
    let done = AtomicBool::new(false);
    const RECORDS: u64 = 50_000;
    let counts: Counts = std::thread::scope(|s| {
        s.spawn(|| {
            let w = r.writer();
            let mut ring = w.ring_writer().unwrap();
            for n in 1..=RECORDS {
                let mut x = sample(0, (n & 0xffff_ffff) as u32, n);
                x.cpu = (n & 0xffff_ffff) as u32;
                ring.push(&x);
                // A varying pace, so the reader both keeps up and gets lapped.
                for _ in 0..(n % 64) {
                    std::hint::spin_loop();
                }
                if n % 128 == 0 {
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::Release);
        });
        let view = validate_guest_region(r.region()).unwrap();
        let mut walker = Walker::starting_at(view.ring(), SEQ_FIRST);
        loop {
            let finished = done.load(Ordering::Acquire);
            match walker.step() {
                Step::Record(rec) => {
                    assert_eq!(rec.record, {
                        let mut x = sample(0, (rec.seq & 0xffff_ffff) as u32, rec.seq);
                        x.cpu = (rec.seq & 0xffff_ffff) as u32;
                        x
                    });
                }
                Step::Empty if finished => break,
                Step::Empty => std::thread::yield_now(),
                Step::Lost { .. } => {}
                Step::Regressed { .. } => panic!("head never goes back"),
            }
        }
        walker.counts()
    });
    eprintln!("racing writer: {counts:?}");
    assert_eq!(counts.read + counts.lost(), RECORDS);
    assert_eq!(counts.regressed, 0);
}

#[test]
fn hostile_rings_and_tables_never_panic() {
    // Seeded garbage in the task table, the ring control block and the ring records: the loop
    // must finish, and read + lost must equal the sequences between start and head.
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200 {
        let r = TestRegion::new(2, 4, 8);
        two_tasks(&r);
        let l = r.layout;
        let start = l.tasks.offset;
        let end = l.ring.slots.offset + 8 * l.ring.slots.stride;
        for _ in 0..(1 + round % 20) {
            let word = start / 8 + usize::try_from(next()).expect("fits") % ((end - start) / 8);
            let value = match next() % 4 {
                0 => next(),
                1 => next() % 32,
                2 => SEQ_WRITING | (next() % 32),
                _ => u64::MAX,
            };
            r.poke(word * 8, value);
        }
        let view = validate_guest_region(r.region()).unwrap();
        let mut table = mirrorball_guest_tools::sink::table::TableSink::new(Vec::new());
        let s = monitor::run(&view, &mut table, &once(), &|| false, &|| Ok(())).unwrap();
        let mut csv = CsvSink::new(Vec::new());
        monitor::run(&view, &mut csv, &once(), &|| false, &|| Ok(())).unwrap();
        let mut mp3 = mirrorball_guest_tools::sink::mp3::Mp3Sink::new(Vec::new(), PERIOD_NS);
        monitor::run(&view, &mut mp3, &once(), &|| false, &|| Ok(())).unwrap();
        let c = s.counts;
        assert!(c.read <= 8, "round {round}: {c:?}");
    }
}

#[test]
fn table_and_mp3_outputs_of_the_binary() {
    let dir = Scratch::new("table");
    let r = TestRegion::new(2, 8, 16);
    two_tasks(&r);
    let file = dir.path("region");
    r.save(&file);
    let f = file.to_str().unwrap();
    let out = run(MONITOR, &["--device", f, "--duration", "0"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.contains(" 101 "))
        .unwrap_or_else(|| panic!("no row for pid 101: {text}"))
        .split_whitespace()
        .collect();
    // Task 0, pid 101, comm, absolute counters of its last record (n = 3).
    assert_eq!(row[..5], ["0", "101", "work", "300", "1"]);
    // 200 faults over 100 ms of guest time; 22 ms of CPU over 100 ms.
    assert_eq!(row[7..], ["2000.0", "10.0", "22.0"]);
    assert!(text.contains(" work-l "), "{text}");

    let out = run(MONITOR, &["--device", f, "--mp3", "--duration", "0"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Ticks at 1050, 1100 and 1150 ms of guest time: baselines, then deltas of both tasks.
    // Task b's records are at n = 2, 4, 6 (timestamps 1100, 1200, 1300 ms), so ticks split.
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let cols: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(cols.len(), 4, "{l}");
        assert!(cols[..3].iter().all(|c| c.parse::<u64>().is_ok()), "{l}");
        assert!(cols[3].parse::<f64>().is_ok(), "{l}");
    }
    let total_min: u64 = lines
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    // Task a: 100 -> 300 (200 faults after its baseline); task b: 200 -> 600 (400).
    assert_eq!(total_min, 600, "{lines:?}");
}

#[test]
fn garbage_gives_one_line_and_a_failure() {
    let dir = Scratch::new("garbage");
    let mut bytes = vec![0u8; 8192];
    let mut x = 0x9e37_79b9u32;
    for b in &mut bytes {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = (x & 0xff) as u8;
    }
    let garbage = dir.path("garbage");
    std::fs::write(&garbage, &bytes).unwrap();
    let out = run(
        MONITOR,
        &["--device", garbage.to_str().unwrap(), "--duration", "0"],
        &[],
    );
    assert_one_line_error(&out, 1, "not a valid mirrorball guest region");
    assert!(out.stdout.is_empty());

    // A valid magic but a header that lies about the region's size.
    let r = TestRegion::new(1, 4, 8);
    r.poke(16, 1 << 40);
    let lying = dir.path("lying");
    r.save(&lying);
    let out = run(
        MONITOR,
        &["--device", lying.to_str().unwrap(), "--csv", "-"],
        &[],
    );
    assert_one_line_error(&out, 1, "bad region size");

    let tiny = dir.path("tiny");
    std::fs::write(&tiny, b"MBGR").unwrap();
    let out = run(MONITOR, &["--device", tiny.to_str().unwrap()], &[]);
    assert_one_line_error(&out, 1, "not a plausible region size");

    let missing = dir.path("missing");
    let out = run(MONITOR, &["--device", missing.to_str().unwrap()], &[]);
    assert_one_line_error(&out, 1, "No such file");

    let out = run(MONITOR, &["--device", "/dev/null", "--duration", "0"], &[]);
    assert_one_line_error(&out, 1, "/dev/null");

    // A character device that maps (as the driver's does) but holds zeros.
    let out = run(MONITOR, &["--device", "/dev/zero", "--duration", "0"], &[]);
    assert_one_line_error(&out, 1, "bad magic 0x00000000");

    let out = run(MONITOR, &["--duration", "soon"], &[]);
    assert_one_line_error(&out, 2, "bad duration");
}

/// A region file mapped read-write and shared by this test, as the driver's memory is.
struct SharedFile {
    ptr: *mut u8,
    len: usize,
}

impl SharedFile {
    fn create(path: &std::path::Path, len: usize) -> Self {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        file.set_len(len as u64).unwrap();
        use std::os::unix::io::AsRawFd;
        // SAFETY: a fresh shared read-write mapping of the whole file; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    fn region(&self) -> RegionMut<'_> {
        // SAFETY: the mapping is live, readable and writable for the borrow of `self`; this
        // process accesses it only through the ABI crate.
        unsafe { RegionMut::from_raw(self.ptr, self.len) }.unwrap()
    }
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly this mapping; the borrows of it have ended.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn live_ring_is_followed_until_ctrl_c() {
    let dir = Scratch::new("live");
    let file = dir.path("region");
    let layout = GuestRegionLayout::new(1, 4, 64).unwrap();
    let shared = SharedFile::create(&file, layout.size);
    let init = RegionInit {
        generation: 1,
        sample_period_ns: PERIOD_NS,
        clock_id: CLOCK_MONOTONIC,
    };
    let region = GuestRegion::format(shared.region(), &layout, &init).unwrap();
    let id = region
        .task_table()
        .register(55, 55, &comm_from(b"work"), 1)
        .unwrap();
    let mut ring = region.ring_writer().unwrap();
    let mut child = std::process::Command::new(MONITOR)
        .args(["--device", file.to_str().unwrap(), "--csv", "-"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    // The header arrives after the first drain: the Ctrl-C handler is installed by then.
    assert_eq!(lines.next().unwrap().unwrap(), HEADER);
    // Four laps of the 64-record ring, in batches of 32 that the monitor prints before the
    // next batch is written, so nothing can be lost whatever the machine's load.
    for batch in 0..8u64 {
        let mut expected = Vec::new();
        for n in 1..=32 {
            let s = sample(id, 55, batch * 32 + n);
            expected.push(csv_row(&s, ring.push(&s)));
        }
        for want in expected {
            assert_eq!(lines.next().unwrap().unwrap(), want);
        }
    }
    let pid = i32::try_from(child.id()).expect("pid fits");
    // SAFETY: sends SIGINT to the child this test spawned and has not yet waited for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        stderr(&out).contains("256 records, 0 lost"),
        "{}",
        stderr(&out)
    );
}
