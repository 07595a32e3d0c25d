//! `vmm record`: every guest and host sample of one VM, one row per sample, as CSV or JSON lines;
//! and reading such a record back ([`read_record`]).
//!
//! Rows ([`Row`]) have a `kind`:
//!
//! | kind | what | fields |
//! |---|---|---|
//! | `meta` | (JSON lines only, first line) the VM | `vm`, `name`, `guest`, `vcpus`, `guest_period_ns`, `host_period_ns`, `started_unix_ms` |
//! | `guest` | one guest sample: a task's ABSOLUTE counters (guest claims) | `vm`, `seq`, `read_ns`, `timestamp_ns` (guest clock), `task_id`, `pid`, `comm`, `cpu`, `flags`, `min_flt`, `maj_flt`, `utime_ns`, `stime_ns` |
//! | `host` | one host sample: a vCPU's deltas over one interval | `vm`, `seq`, `read_ns`, `timestamp_ns` (host `CLOCK_MONOTONIC`), `task_id`, `pid`, `comm` (attributed task), `vcpu`, `attr_flags`, `interval_ns`, `pf_taken`, `pf_fixed`, `exits`, `host_min_flt`, `host_maj_flt`, `vcpu_utime_ns`, `vcpu_stime_ns`, `guest_switch_count` |
//! | `lost` | records of a ring the recorder could not read | `vm`, `ring` (`guest`/`host`), `seq` (first lost), `count`, `read_ns` |
//!
//! Rows of one poll come as its `lost` rows, then its guest rows, then its host rows, each in
//! sequence order (the two rings have different clocks; sort by `timestamp_ns` within a kind).
//! `read_ns` is the recorder's host `CLOCK_MONOTONIC` when it read the record; `comm` is the
//! task table's name for `task_id` if its entry has the same pid (sanitised). CSV has one header
//! line and the union of the columns (`vcpu` goes in `cpu`, `attr_flags` in `flags`); columns a
//! kind does not have are empty.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mirrorball_profiler_abi::{GuestSample, HostSample, SeqRecord, TASK_NONE};
use serde::{Deserialize, Serialize};

use crate::open::{Batch, OpenVm, VmStatus};
use crate::rundir::{scan, VmHandle, VmId};
use crate::{comm_text, Error};

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated values with a header line.
    #[default]
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "jsonl" | "json" | "ndjson" => Ok(Format::Jsonl),
            _ => Err(format!("{s:?} is not a record format (csv or jsonl)")),
        }
    }
}

/// The VM a record is of (JSON lines only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRow {
    /// `PID-N`.
    pub vm: String,
    /// Name from the metadata.
    #[serde(default)]
    pub name: String,
    /// `linux` or `workload`.
    #[serde(default)]
    pub guest: String,
    /// vCPUs (host region).
    #[serde(default)]
    pub vcpus: u32,
    /// Guest sampler period, ns.
    #[serde(default)]
    pub guest_period_ns: u64,
    /// Host sampler period, ns.
    #[serde(default)]
    pub host_period_ns: u64,
    /// Wall-clock start of the VM, ms since the epoch.
    #[serde(default)]
    pub started_unix_ms: u64,
}

/// One guest sample.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct GuestRow {
    #[serde(default)]
    pub vm: String,
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub read_ns: u64,
    #[serde(default)]
    pub timestamp_ns: u64,
    #[serde(default)]
    pub task_id: u32,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub cpu: u32,
    #[serde(default)]
    pub flags: u32,
    #[serde(default)]
    pub min_flt: u64,
    #[serde(default)]
    pub maj_flt: u64,
    #[serde(default)]
    pub utime_ns: u64,
    #[serde(default)]
    pub stime_ns: u64,
}

/// One host sample.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct HostRow {
    #[serde(default)]
    pub vm: String,
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub read_ns: u64,
    #[serde(default)]
    pub timestamp_ns: u64,
    #[serde(default)]
    pub task_id: u32,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub vcpu: u32,
    #[serde(default)]
    pub attr_flags: u32,
    #[serde(default)]
    pub interval_ns: u64,
    #[serde(default)]
    pub pf_taken: u64,
    #[serde(default)]
    pub pf_fixed: u64,
    #[serde(default)]
    pub exits: u64,
    #[serde(default)]
    pub host_min_flt: u64,
    #[serde(default)]
    pub host_maj_flt: u64,
    #[serde(default)]
    pub vcpu_utime_ns: u64,
    #[serde(default)]
    pub vcpu_stime_ns: u64,
    #[serde(default)]
    pub guest_switch_count: u64,
}

/// Records lost on one ring.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRow {
    /// `PID-N`.
    #[serde(default)]
    pub vm: String,
    /// `guest` or `host`.
    #[serde(default)]
    pub ring: String,
    /// First lost sequence number.
    #[serde(default)]
    pub seq: u64,
    /// Records lost.
    #[serde(default)]
    pub count: u64,
    /// When the loss was noticed (host monotonic ns).
    #[serde(default)]
    pub read_ns: u64,
}

/// One line of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Row {
    /// The VM.
    Meta(MetaRow),
    /// A guest sample.
    Guest(GuestRow),
    /// A host sample.
    Host(HostRow),
    /// A gap.
    Lost(LostRow),
}

impl GuestRow {
    /// A row from a sample.
    pub fn new(vm: VmId, read_ns: u64, r: &SeqRecord<GuestSample>, comm: String) -> Self {
        let s = &r.record;
        Self {
            vm: vm.to_string(),
            seq: r.seq,
            read_ns,
            timestamp_ns: s.timestamp_ns,
            task_id: s.task_id,
            pid: s.pid,
            comm,
            cpu: s.cpu,
            flags: s.flags,
            min_flt: s.min_flt,
            maj_flt: s.maj_flt,
            utime_ns: s.utime_ns,
            stime_ns: s.stime_ns,
        }
    }

    /// The sample again.
    pub fn sample(&self) -> GuestSample {
        GuestSample {
            timestamp_ns: self.timestamp_ns,
            task_id: self.task_id,
            pid: self.pid,
            min_flt: self.min_flt,
            maj_flt: self.maj_flt,
            utime_ns: self.utime_ns,
            stime_ns: self.stime_ns,
            cpu: self.cpu,
            flags: self.flags,
        }
    }
}

impl HostRow {
    /// A row from a sample.
    pub fn new(vm: VmId, read_ns: u64, r: &SeqRecord<HostSample>, comm: String) -> Self {
        let s = &r.record;
        Self {
            vm: vm.to_string(),
            seq: r.seq,
            read_ns,
            timestamp_ns: s.timestamp_ns,
            task_id: s.task_id,
            pid: s.pid,
            comm,
            vcpu: s.vcpu,
            attr_flags: s.attr_flags,
            interval_ns: s.interval_ns,
            pf_taken: s.pf_taken,
            pf_fixed: s.pf_fixed,
            exits: s.exits,
            host_min_flt: s.host_min_flt,
            host_maj_flt: s.host_maj_flt,
            vcpu_utime_ns: s.vcpu_utime_ns,
            vcpu_stime_ns: s.vcpu_stime_ns,
            guest_switch_count: s.guest_switch_count,
        }
    }

    /// The sample again.
    pub fn sample(&self) -> HostSample {
        HostSample {
            timestamp_ns: self.timestamp_ns,
            task_id: self.task_id,
            pid: self.pid,
            vcpu: self.vcpu,
            attr_flags: self.attr_flags,
            interval_ns: self.interval_ns,
            pf_taken: self.pf_taken,
            pf_fixed: self.pf_fixed,
            exits: self.exits,
            host_min_flt: self.host_min_flt,
            host_maj_flt: self.host_maj_flt,
            vcpu_utime_ns: self.vcpu_utime_ns,
            vcpu_stime_ns: self.vcpu_stime_ns,
            guest_switch_count: self.guest_switch_count,
        }
    }
}

/// CSV columns, in order.
pub const CSV_COLUMNS: [&str; 25] = [
    "kind",
    "vm",
    "seq",
    "read_ns",
    "timestamp_ns",
    "task_id",
    "pid",
    "comm",
    "cpu",
    "flags",
    "min_flt",
    "maj_flt",
    "utime_ns",
    "stime_ns",
    "interval_ns",
    "pf_taken",
    "pf_fixed",
    "exits",
    "host_min_flt",
    "host_maj_flt",
    "vcpu_utime_ns",
    "vcpu_stime_ns",
    "guest_switch_count",
    "count",
    "ring",
];

fn csv_field(out: &mut String, text: &str) {
    if text.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

fn csv_line(fields: &[(&str, String)]) -> String {
    let mut line = String::new();
    for (i, col) in CSV_COLUMNS.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if let Some((_, v)) = fields.iter().find(|(c, _)| c == col) {
            csv_field(&mut line, v);
        }
    }
    line.push('\n');
    line
}

impl Row {
    /// The CSV line of this row (empty for `meta`, which CSV does not carry).
    pub fn to_csv(&self) -> String {
        let s = |v: &dyn ToString| v.to_string();
        match self {
            Row::Meta(_) => String::new(),
            Row::Guest(g) => csv_line(&[
                ("kind", "guest".into()),
                ("vm", g.vm.clone()),
                ("seq", s(&g.seq)),
                ("read_ns", s(&g.read_ns)),
                ("timestamp_ns", s(&g.timestamp_ns)),
                ("task_id", s(&g.task_id)),
                ("pid", s(&g.pid)),
                ("comm", g.comm.clone()),
                ("cpu", s(&g.cpu)),
                ("flags", s(&g.flags)),
                ("min_flt", s(&g.min_flt)),
                ("maj_flt", s(&g.maj_flt)),
                ("utime_ns", s(&g.utime_ns)),
                ("stime_ns", s(&g.stime_ns)),
            ]),
            Row::Host(h) => csv_line(&[
                ("kind", "host".into()),
                ("vm", h.vm.clone()),
                ("seq", s(&h.seq)),
                ("read_ns", s(&h.read_ns)),
                ("timestamp_ns", s(&h.timestamp_ns)),
                ("task_id", s(&h.task_id)),
                ("pid", s(&h.pid)),
                ("comm", h.comm.clone()),
                ("cpu", s(&h.vcpu)),
                ("flags", s(&h.attr_flags)),
                ("interval_ns", s(&h.interval_ns)),
                ("pf_taken", s(&h.pf_taken)),
                ("pf_fixed", s(&h.pf_fixed)),
                ("exits", s(&h.exits)),
                ("host_min_flt", s(&h.host_min_flt)),
                ("host_maj_flt", s(&h.host_maj_flt)),
                ("vcpu_utime_ns", s(&h.vcpu_utime_ns)),
                ("vcpu_stime_ns", s(&h.vcpu_stime_ns)),
                ("guest_switch_count", s(&h.guest_switch_count)),
            ]),
            Row::Lost(l) => csv_line(&[
                ("kind", "lost".into()),
                ("vm", l.vm.clone()),
                ("seq", s(&l.seq)),
                ("read_ns", s(&l.read_ns)),
                ("count", s(&l.count)),
                ("ring", l.ring.clone()),
            ]),
        }
    }
}

/// Splits one CSV line (RFC 4180 quoting; no newlines inside fields).
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => cur.push(c),
            (false, '"') if cur.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut cur)),
            (false, c) => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

fn row_from_csv(header: &HashMap<String, usize>, fields: &[String]) -> Result<Row, String> {
    let get = |name: &str| -> &str {
        header
            .get(name)
            .and_then(|&i| fields.get(i))
            .map_or("", |s| s.as_str())
    };
    fn num<T: FromStr + Default>(name: &str, text: &str) -> Result<T, String> {
        if text.is_empty() {
            return Ok(T::default());
        }
        text.parse()
            .map_err(|_| format!("column {name}: {text:?} is not a number"))
    }
    macro_rules! n {
        ($name:literal) => {
            num($name, get($name))?
        };
    }
    Ok(match get("kind") {
        "guest" => Row::Guest(GuestRow {
            vm: get("vm").into(),
            seq: n!("seq"),
            read_ns: n!("read_ns"),
            timestamp_ns: n!("timestamp_ns"),
            task_id: n!("task_id"),
            pid: n!("pid"),
            comm: get("comm").into(),
            cpu: n!("cpu"),
            flags: n!("flags"),
            min_flt: n!("min_flt"),
            maj_flt: n!("maj_flt"),
            utime_ns: n!("utime_ns"),
            stime_ns: n!("stime_ns"),
        }),
        "host" => Row::Host(HostRow {
            vm: get("vm").into(),
            seq: n!("seq"),
            read_ns: n!("read_ns"),
            timestamp_ns: n!("timestamp_ns"),
            task_id: n!("task_id"),
            pid: n!("pid"),
            comm: get("comm").into(),
            vcpu: n!("cpu"),
            attr_flags: n!("flags"),
            interval_ns: n!("interval_ns"),
            pf_taken: n!("pf_taken"),
            pf_fixed: n!("pf_fixed"),
            exits: n!("exits"),
            host_min_flt: n!("host_min_flt"),
            host_maj_flt: n!("host_maj_flt"),
            vcpu_utime_ns: n!("vcpu_utime_ns"),
            vcpu_stime_ns: n!("vcpu_stime_ns"),
            guest_switch_count: n!("guest_switch_count"),
        }),
        "lost" => Row::Lost(LostRow {
            vm: get("vm").into(),
            ring: get("ring").into(),
            seq: n!("seq"),
            count: n!("count"),
            read_ns: n!("read_ns"),
        }),
        other => return Err(format!("unknown kind {other:?}")),
    })
}

/// A record read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recording {
    /// Where it came from.
    pub path: PathBuf,
    /// Its rows, in file order.
    pub rows: Vec<Row>,
    /// Lines that could not be parsed (skipped).
    pub bad_lines: usize,
    /// The first such line's problem.
    pub first_error: Option<String>,
}

impl Recording {
    /// The guest rows.
    pub fn guest(&self) -> impl Iterator<Item = &GuestRow> {
        self.rows.iter().filter_map(|r| match r {
            Row::Guest(g) => Some(g),
            _ => None,
        })
    }

    /// The host rows.
    pub fn host(&self) -> impl Iterator<Item = &HostRow> {
        self.rows.iter().filter_map(|r| match r {
            Row::Host(h) => Some(h),
            _ => None,
        })
    }

    /// The meta row, if any.
    pub fn meta(&self) -> Option<&MetaRow> {
        self.rows.iter().find_map(|r| match r {
            Row::Meta(m) => Some(m),
            _ => None,
        })
    }
}

/// Longest line [`read_record`] accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// Parses a record from text in either format (JSON lines if the first non-blank line starts
/// with `{`, else CSV with a header line). Bad lines are skipped and counted.
pub fn parse_record(input: impl BufRead, path: &Path) -> Result<Recording, Error> {
    let mut rec = Recording {
        path: path.to_path_buf(),
        ..Recording::default()
    };
    let mut csv_header: Option<HashMap<String, usize>> = None;
    let mut jsonl: Option<bool> = None;
    for (lineno, line) in input.lines().enumerate() {
        let line = line.map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut bad = |msg: String| {
            rec.bad_lines += 1;
            if rec.first_error.is_none() {
                rec.first_error = Some(format!("{}:{}: {msg}", path.display(), lineno + 1));
            }
        };
        if line.len() > MAX_LINE {
            bad("line too long".into());
            continue;
        }
        let is_jsonl = *jsonl.get_or_insert_with(|| line.trim_start().starts_with('{'));
        if is_jsonl {
            match serde_json::from_str::<Row>(line) {
                Ok(row) => rec.rows.push(row),
                Err(e) => bad(e.to_string()),
            }
        } else if let Some(header) = &csv_header {
            match row_from_csv(header, &split_csv(line)) {
                Ok(row) => rec.rows.push(row),
                Err(e) => bad(e),
            }
        } else {
            let cols: HashMap<String, usize> = split_csv(line)
                .into_iter()
                .enumerate()
                .map(|(i, c)| (c.trim().to_string(), i))
                .collect();
            if !cols.contains_key("kind") {
                return Err(Error::new(format!(
                    "{}: neither JSON lines nor CSV with a header naming a \"kind\" column",
                    path.display()
                )));
            }
            csv_header = Some(cols);
        }
    }
    Ok(rec)
}

/// Reads a record file (see [`parse_record`]).
pub fn read_record(path: &Path) -> Result<Recording, Error> {
    let file = fs::File::open(path).map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
    parse_record(io::BufReader::new(file), path)
}

/// Writes rows in one format.
pub struct RowWriter<W: Write> {
    out: W,
    format: Format,
    header_done: bool,
}

impl<W: Write> RowWriter<W> {
    /// A writer (CSV writes its header before the first row).
    pub fn new(out: W, format: Format) -> Self {
        Self {
            out,
            format,
            header_done: false,
        }
    }

    /// Writes one row.
    pub fn write(&mut self, row: &Row) -> io::Result<()> {
        match self.format {
            Format::Csv => {
                if !self.header_done {
                    self.out.write_all(CSV_COLUMNS.join(",").as_bytes())?;
                    self.out.write_all(b"\n")?;
                    self.header_done = true;
                }
                self.out.write_all(row.to_csv().as_bytes())
            }
            Format::Jsonl => {
                serde_json::to_writer(&mut self.out, row)?;
                self.out.write_all(b"\n")
            }
        }
    }

    /// Flushes.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

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
    let mut rows = Vec::with_capacity(batch.guest.len() + batch.host.len() + batch.losses.len());
    for l in &batch.losses {
        rows.push(Row::Lost(LostRow {
            vm: id.to_string(),
            ring: l.ring.as_str().into(),
            seq: l.first,
            count: l.count,
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
    /// Why it stopped.
    pub stopped: String,
}

impl std::fmt::Display for RecordSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recorded {} guest and {} host samples of VM {} (lost {} guest, {} host); {}",
            self.guest,
            self.host,
            self.vm.map_or("?".into(), |v| v.to_string()),
            self.lost_guest,
            self.lost_host,
            self.stopped
        )
    }
}

fn is_stdout(p: &Option<PathBuf>) -> bool {
    p.as_ref().is_none_or(|p| p.as_os_str() == "-")
}

/// Records one VM until its files disappear, `duration` passes or `stop` is set.
pub fn record(opts: &RecordOptions, stop: &AtomicBool) -> Result<RecordSummary, Error> {
    let handle = pick_vm(&opts.run_dir, opts.vm)?;
    let mut vm = handle.open().map_err(|e| Error::new(e.to_string()))?;
    let out: Box<dyn Write> = if is_stdout(&opts.output) {
        Box::new(io::stdout().lock())
    } else {
        let path = opts.output.as_ref().expect("not stdout");
        Box::new(
            fs::File::create(path).map_err(|e| Error::new(format!("{}: {e}", path.display())))?,
        )
    };
    let mut w = RowWriter::new(BufWriter::new(out), opts.format);
    let mut summary = RecordSummary {
        vm: Some(vm.id()),
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
