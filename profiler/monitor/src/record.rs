//! `vmm record`: every guest and host sample of one VM, one row per sample, as CSV or JSON lines;
//! and reading such a record back ([`read_record`]).
//!
//! Rows ([`Row`]) have a `kind`:
//!
//! | kind | what | fields |
//! |---|---|---|
//! | `meta` | (JSON lines only, first line) the VM | `vm`, `name`, `guest`, `vcpus`, `guest_period_ns`, `host_period_ns`, `started_unix_ms` |
//! | `guest` | one guest sample: a task's ABSOLUTE counters (guest claims) | `vm`, `seq`, `read_ns`, `timestamp_ns` (guest clock), `task_id`, `pid`, `comm`, `cpu`, `flags`, `min_flt`, `maj_flt`, `utime_ns`, `stime_ns` |
//! | `host` | one host sample: a vCPU's deltas over one interval | `vm`, `seq`, `read_ns`, `timestamp_ns` (host `CLOCK_MONOTONIC`), `task_id`, `pid`, `comm` (attributed task), `vcpu`, `attr_flags`, `interval_ns`, `pf_taken`, `pf_fixed`, `exits`, `host_min_flt`, `host_maj_flt`, `vcpu_utime_ns`, `vcpu_stime_ns`, `guest_switch_count`, `slot_flags`, `switches`, `attribution` (`exact`, `sampled`, `merged`, `memory` or `unattributed`), `cow_breaks` (memory records: copy-on-write breaks charged to the task), `vcpu_wait_ns` (the vCPU thread's host run-queue wait: steal) |
//! | `lost` | records of a ring the recorder could not read | `vm`, `ring` (`guest`/`host`), `seq` (first lost), `count`, `read_ns` |
//! | `memory` | the VM's memory against its template at a sharing scan (each new scan seen) | `vm`, `read_ns`, `timestamp_ns` (the scan, host `CLOCK_MONOTONIC`), `flags` (1: a clone of a template), `ram_pages`, `shared_pages`, `private_pages`, `merged_pages`, `cow_breaks` (since the VM started) |
//!
//! Rows of one poll come as its `lost` rows, then its guest rows, then its host rows, each in
//! sequence order (the two rings have different clocks; sort by `timestamp_ns` within a kind).
//! `read_ns` is the recorder's host `CLOCK_MONOTONIC` when it read the record; `comm` is the
//! task table's name for `task_id` if its entry has the same pid (sanitised). CSV has one header
//! line and the union of the columns (`vcpu` goes in `cpu`, `attr_flags` in `flags`); columns a
//! kind does not have are empty.

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mirrorball_profiler_abi::TASK_NONE;

use crate::open::{Batch, OpenVm, Ring, VmStatus};
use crate::rundir::{scan, VmHandle, VmId};
use crate::{comm_text, Error};

mod csv;
mod rows;
pub use csv::CSV_COLUMNS;
pub use rows::*;

/// Names of tasks by task id, read from the task table when a sample names a task with a pid
/// the cache has not seen for that id.
#[derive(Debug, Default)]
pub struct CommCache {
    names: HashMap<u32, (u32, String)>,
}

impl CommCache {
    /// The (sanitised) name of `task_id` if its entry belongs to `pid`, else empty.
    pub fn name(&mut self, vm: &OpenVm, task_id: u32, pid: u32) -> String {
        if task_id == TASK_NONE {
            return String::new();
        }
        if let Some((p, name)) = self.names.get(&task_id) {
            if *p == pid {
                return name.clone();
            }
        }
        match vm.task(task_id) {
            Ok(t) => {
                let name = if t.pid == pid {
                    comm_text(&t.comm)
                } else {
                    String::new()
                };
                // At most one entry per task-table index (bounded by the table's capacity).
                self.names.insert(task_id, (pid, name.clone()));
                name
            }
            Err(_) => String::new(),
        }
    }
}

/// The rows of one batch.
pub fn batch_rows(vm: &OpenVm, batch: &Batch, names: &mut CommCache) -> Vec<Row> {
    let id = vm.id();
    let mut rows = Vec::with_capacity(batch.guest.len() + batch.host.len() + 2);
    // At most one `lost` row per ring and poll (its first lost sequence and the total): a guest
    // that scribbles over every slot of its ring makes as many gaps as there are slots, and must
    // not make the recorder write a row for each.
    for ring in [Ring::Guest, Ring::Host] {
        let mut gaps = batch.losses.iter().filter(|l| l.ring == ring);
        let Some(first) = gaps.next() else { continue };
        let count = gaps.fold(first.count, |n, l| n.saturating_add(l.count));
        rows.push(Row::Lost(LostRow {
            vm: id.to_string(),
            ring: ring.as_str().into(),
            seq: first.first,
            count,
            read_ns: batch.read_ns,
        }));
    }
    for r in &batch.guest {
        let comm = names.name(vm, r.record.task_id, r.record.pid);
        rows.push(Row::Guest(GuestRow::new(id, batch.read_ns, r, comm)));
    }
    for r in &batch.host {
        let comm = names.name(vm, r.record.task_id, r.record.pid);
        rows.push(Row::Host(HostRow::new(id, batch.read_ns, r, comm)));
    }
    rows
}

/// Chooses the VM to attach to: `wanted` if given, else the only live one.
pub fn pick_vm(run_dir: &Path, wanted: Option<VmId>) -> Result<VmHandle, Error> {
    let s = scan(run_dir).map_err(|e| Error::new(format!("{}: {e}", run_dir.display())))?;
    if let Some(id) = wanted {
        if let Some(h) = s.live.into_iter().find(|h| h.id == id) {
            return Ok(h);
        }
        if let Some(st) = s.stale.iter().find(|st| st.id == id) {
            return Err(Error::new(format!("VM {id} is stale: {}", st.reason)));
        }
        return Err(Error::new(format!("no VM {id} in {}", run_dir.display())));
    }
    match s.live.len() {
        0 => Err(Error::new(format!(
            "no running VM in {}{}",
            run_dir.display(),
            if s.stale.is_empty() {
                String::new()
            } else {
                format!(" ({} stale file set(s) ignored)", s.stale.len())
            }
        ))),
        1 => Ok(s.live.into_iter().next().expect("one VM")),
        n => Err(Error::new(format!(
            "{n} VMs are running in {} ({}): choose one with --vm",
            run_dir.display(),
            s.live
                .iter()
                .map(|h| h.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// [`pick_vm`], retried every 20 ms for up to `wait` (or until `stop` is set) while it fails:
/// lets a recorder be started before the VM it records.
pub fn wait_for_vm(
    run_dir: &Path,
    wanted: Option<VmId>,
    wait: Option<Duration>,
    stop: &AtomicBool,
) -> Result<VmHandle, Error> {
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        match pick_vm(run_dir, wanted) {
            Ok(handle) => return Ok(handle),
            Err(e) => {
                let waiting = deadline.is_some_and(|d| Instant::now() < d);
                if !waiting || stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(e);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `vmm record` does.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The VM, if several run.
    pub vm: Option<VmId>,
    /// Output format.
    pub format: Format,
    /// Output file; `None` or `-` for standard output.
    pub output: Option<PathBuf>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Time between polls.
    pub poll_interval: Duration,
    /// How long to wait for the VM to appear in the run directory (`None`: it must be there).
    pub wait: Option<Duration>,
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            run_dir: crate::resolve_run_dir(None),
            vm: None,
            format: Format::Csv,
            output: None,
            duration: None,
            poll_interval: Duration::from_millis(20),
            wait: None,
        }
    }
}

/// What a recording did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordSummary {
    /// The VM.
    pub vm: Option<VmId>,
    /// Guest rows written.
    pub guest: u64,
    /// Host rows written.
    pub host: u64,
    /// Guest records lost.
    pub lost_guest: u64,
    /// Host records lost.
    pub lost_host: u64,
    /// Memory rows written (sharing scans seen).
    pub memory: u64,
    /// Why it stopped.
    pub stopped: String,
    /// Why the guest region was invalid (only host samples were recorded), if it was.
    pub guest_error: Option<String>,
}

impl std::fmt::Display for RecordSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recorded {} guest and {} host samples and {} memory scans of VM {} (lost {} guest, {} \
             host); {}",
            self.guest,
            self.host,
            self.memory,
            self.vm.map_or("?".into(), |v| v.to_string()),
            self.lost_guest,
            self.lost_host,
            self.stopped
        )?;
        if let Some(e) = &self.guest_error {
            write!(f, "; warning: guest region invalid, host samples only: {e}")?;
        }
        Ok(())
    }
}

fn is_stdout(p: &Option<PathBuf>) -> bool {
    p.as_ref().is_none_or(|p| p.as_os_str() == "-")
}

/// Records one VM until its files disappear, `duration` passes or `stop` is set.
pub fn record(opts: &RecordOptions, stop: &AtomicBool) -> Result<RecordSummary, Error> {
    let handle = wait_for_vm(&opts.run_dir, opts.vm, opts.wait, stop)?;
    let mut vm = handle.open().map_err(|e| Error::new(e.to_string()))?;
    let out: Box<dyn Write> = if is_stdout(&opts.output) {
        Box::new(io::stdout().lock())
    } else {
        let path = opts.output.as_ref().expect("not stdout");
        Box::new(crate::userfile::create_output(path)?)
    };
    let mut w = RowWriter::new(BufWriter::new(out), opts.format);
    let mut summary = RecordSummary {
        vm: Some(vm.id()),
        guest_error: vm.guest_error().map(str::to_string),
        ..RecordSummary::default()
    };
    let start = Instant::now();
    let result = (|| -> Result<String, Error> {
        if opts.format == Format::Jsonl {
            let meta = vm.meta().cloned().unwrap_or_default();
            w.write(&Row::Meta(MetaRow {
                vm: vm.id().to_string(),
                name: crate::sanitize(meta.name.as_bytes(), 64),
                guest: crate::sanitize(meta.guest.as_bytes(), 16),
                vcpus: vm.vcpu_count(),
                guest_period_ns: vm.guest_period_ns(),
                host_period_ns: vm.host_period_ns(),
                started_unix_ms: meta.started_unix_ms,
            }))?;
        }
        let mut names = CommCache::default();
        let mut last_scan = 0;
        loop {
            let status = vm.status();
            let batch = match vm.poll() {
                Ok(b) => b,
                Err(e) => return Ok(format!("stopped: {e}")),
            };
            for row in batch_rows(&vm, &batch, &mut names) {
                match &row {
                    Row::Guest(_) => summary.guest += 1,
                    Row::Host(_) => summary.host += 1,
                    _ => {}
                }
                w.write(&row)?;
            }
            if let Some(m) = vm.host_view().mem_sharing() {
                if m.scanned_ns != last_scan {
                    last_scan = m.scanned_ns;
                    summary.memory += 1;
                    w.write(&Row::Memory(MemoryRow::new(vm.id(), batch.read_ns, &m)))?;
                }
            }
            summary.lost_guest += batch.lost_guest;
            summary.lost_host += batch.lost_host;
            w.flush()?;
            if let VmStatus::Ended(why) = status {
                return Ok(format!("VM ended: {why}"));
            }
            if stop.load(Ordering::Relaxed) {
                return Ok("interrupted".into());
            }
            let elapsed = start.elapsed();
            if let Some(d) = opts.duration {
                if elapsed >= d {
                    return Ok(format!("{:.1} s elapsed", d.as_secs_f64()));
                }
            }
            if !batch.truncated {
                let mut nap = opts.poll_interval;
                if let Some(d) = opts.duration {
                    nap = nap.min(d.saturating_sub(elapsed));
                }
                std::thread::sleep(nap);
            }
        }
    })();
    match result {
        Ok(stopped) => summary.stopped = stopped,
        Err(e) if e.is_broken_pipe() => summary.stopped = "output closed".into(),
        Err(e) => return Err(e),
    }
    let _ = w.flush();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::csv::split_csv;
    use super::*;

    fn rows() -> Vec<Row> {
        vec![
            Row::Meta(MetaRow {
                vm: "1-0".into(),
                name: "n".into(),
                ..MetaRow::default()
            }),
            Row::Guest(GuestRow {
                vm: "1-0".into(),
                seq: 1,
                task_id: 2,
                pid: 3,
                comm: "a,\"b\"".into(),
                min_flt: 10,
                utime_ns: 5,
                ..GuestRow::default()
            }),
            Row::Host(HostRow {
                vm: "1-0".into(),
                seq: 1,
                task_id: TASK_NONE,
                vcpu: 1,
                attr_flags: 4,
                pf_taken: 9,
                interval_ns: 50,
                ..HostRow::default()
            }),
            Row::Lost(LostRow {
                vm: "1-0".into(),
                ring: "guest".into(),
                seq: 5,
                count: 2,
                read_ns: 7,
            }),
        ]
    }

    fn round_trip(format: Format) -> Recording {
        let mut w = RowWriter::new(Vec::new(), format);
        for r in rows() {
            w.write(&r).unwrap();
        }
        let bytes = w.into_inner();
        parse_record(&bytes[..], Path::new("mem")).unwrap()
    }

    #[test]
    fn jsonl_round_trips() {
        let rec = round_trip(Format::Jsonl);
        assert_eq!(rec.rows, rows());
        assert_eq!(rec.bad_lines, 0);
    }

    #[test]
    fn csv_round_trips_without_meta() {
        let rec = round_trip(Format::Csv);
        assert_eq!(rec.rows, rows()[1..].to_vec());
        assert_eq!(rec.guest().count(), 1);
        assert_eq!(rec.host().next().unwrap().pf_taken, 9);
    }

    #[test]
    fn bad_lines_are_counted_not_fatal() {
        let text = "kind,seq,min_flt\nguest,1,2\nguest,x,2\nbogus,1,1\nhost,2\n";
        let rec = parse_record(text.as_bytes(), Path::new("t")).unwrap();
        assert_eq!(rec.rows.len(), 2);
        assert_eq!(rec.bad_lines, 2);
        assert!(rec.first_error.unwrap().contains("t:3"));
        let text = "{\"kind\":\"guest\",\"seq\":1}\nnot json\n";
        let rec = parse_record(text.as_bytes(), Path::new("t")).unwrap();
        assert_eq!((rec.rows.len(), rec.bad_lines), (1, 1));
        assert!(parse_record("a,b\n1,2\n".as_bytes(), Path::new("t")).is_err());
        assert!(parse_record("".as_bytes(), Path::new("t"))
            .unwrap()
            .rows
            .is_empty());
    }

    #[test]
    fn formats_parse() {
        assert_eq!("CSV".parse(), Ok(Format::Csv));
        assert_eq!("jsonl".parse(), Ok(Format::Jsonl));
        assert!("xml".parse::<Format>().is_err());
        assert_eq!(
            split_csv("a,\"b,c\",\"d\"\"e\","),
            vec!["a", "b,c", "d\"e", ""]
        );
    }
}
