//! The rows of a record and their two encodings (CSV, JSON lines): writing them, and parsing a
//! record back. The table of kinds and fields is in the parent module's docs.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use mirrorball_profiler_abi::{GuestSample, HostSample, SeqRecord};
use serde::{Deserialize, Serialize};

use crate::rundir::VmId;
use crate::Error;

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
pub(crate) fn split_csv(line: &str) -> Vec<String> {
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
