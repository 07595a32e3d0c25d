//! The rows of a record, writing them in either format (CSV, JSON lines), and parsing a record
//! back. The table of kinds and fields is in the parent module's docs; the CSV encoding is in
//! [`super::csv`].

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use mirrorball_profiler_abi::{GuestSample, HostSample, MemSharingFigures, SeqRecord};
use serde::{Deserialize, Serialize};

use super::csv::{row_from_csv, split_csv, CSV_COLUMNS};
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
#[serde(default)]
pub struct GuestRow {
    pub vm: String,
    pub seq: u64,
    pub read_ns: u64,
    pub timestamp_ns: u64,
    pub task_id: u32,
    pub pid: u32,
    pub comm: String,
    pub cpu: u32,
    pub flags: u32,
    pub min_flt: u64,
    pub maj_flt: u64,
    pub utime_ns: u64,
    pub stime_ns: u64,
}

/// One host sample.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
#[serde(default)]
pub struct HostRow {
    pub vm: String,
    pub seq: u64,
    pub read_ns: u64,
    pub timestamp_ns: u64,
    pub task_id: u32,
    pub pid: u32,
    pub comm: String,
    pub vcpu: u32,
    pub attr_flags: u32,
    pub interval_ns: u64,
    pub pf_taken: u64,
    pub pf_fixed: u64,
    pub exits: u64,
    pub host_min_flt: u64,
    pub host_maj_flt: u64,
    pub vcpu_utime_ns: u64,
    pub vcpu_stime_ns: u64,
    pub guest_switch_count: u64,
    /// The vCPU slot's flags of the attributed task (idle, kernel thread).
    pub slot_flags: u32,
    /// Announced task switches that closed intervals of this record.
    pub switches: u32,
    /// How the figures were attributed (`attribution_name` of `attr_flags`).
    pub attribution: String,
    /// Copy-on-write breaks charged to the task (memory records; ABI minor 3).
    pub cow_breaks: u64,
    /// Host run-queue wait of the vCPU thread (steal), ns (ABI minor 3).
    pub vcpu_wait_ns: u64,
}

/// Records lost on one ring.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LostRow {
    /// `PID-N`.
    pub vm: String,
    /// `guest` or `host`.
    pub ring: String,
    /// First lost sequence number.
    pub seq: u64,
    /// Records lost.
    pub count: u64,
    /// When the loss was noticed (host monotonic ns).
    pub read_ns: u64,
}

/// The VM's memory against its template at one sharing scan (the host region's
/// `mb_mem_sharing`), written when a new scan is seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryRow {
    /// `PID-N`.
    pub vm: String,
    /// When the recorder read it (host monotonic ns).
    pub read_ns: u64,
    /// When the VMM scanned (host monotonic ns).
    pub timestamp_ns: u64,
    /// 1 when the VM's RAM is a copy-on-write clone of a template.
    pub flags: u32,
    /// Guest RAM, pages.
    pub ram_pages: u64,
    /// Pages that map the template's.
    pub shared_pages: u64,
    /// Pages of the VM's own.
    pub private_pages: u64,
    /// Private pages KSM merged.
    pub merged_pages: u64,
    /// Copy-on-write breaks since the VM started.
    pub cow_breaks: u64,
}

impl MemoryRow {
    /// A row from the figures of one scan.
    pub fn new(vm: VmId, read_ns: u64, m: &MemSharingFigures) -> Self {
        Self {
            vm: vm.to_string(),
            read_ns,
            timestamp_ns: m.scanned_ns,
            flags: u32::from(m.cloned),
            ram_pages: m.ram_pages,
            shared_pages: m.shared_pages,
            private_pages: m.private_pages,
            merged_pages: m.merged_pages,
            cow_breaks: m.cow_breaks,
        }
    }
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
    /// The VM's memory sharing at a scan.
    Memory(MemoryRow),
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
            slot_flags: s.slot_flags,
            switches: s.switches,
            attribution: mirrorball_profiler_abi::attribution_name(s.attr_flags).to_string(),
            cow_breaks: s.cow_breaks,
            vcpu_wait_ns: s.vcpu_wait_ns,
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
            slot_flags: self.slot_flags,
            switches: self.switches,
            cow_breaks: self.cow_breaks,
            vcpu_wait_ns: self.vcpu_wait_ns,
        }
    }
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
    let mut input = input;
    let mut bytes = Vec::new();
    for lineno in 0.. {
        let more = next_line(&mut input, &mut bytes)
            .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
        if !more {
            break;
        }
        let Ok(line) = std::str::from_utf8(&bytes) else {
            rec.bad_lines += 1;
            if rec.first_error.is_none() {
                rec.first_error = Some(format!("{}:{}: not UTF-8", path.display(), lineno + 1));
            }
            continue;
        };
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
    let file = crate::userfile::open_input(path, MAX_RECORD_BYTES)?;
    parse_record(io::BufReader::new(file), path)
}

/// Largest record file [`read_record`] reads.
pub const MAX_RECORD_BYTES: u64 = 4 << 30;

/// Reads the next line (without its newline) into `line`, at most [`MAX_LINE`] + 1 bytes of it
/// held at once; the rest of a longer line is skipped. `Ok(false)` at the end of the input.
fn next_line<R: BufRead>(input: &mut R, line: &mut Vec<u8>) -> io::Result<bool> {
    line.clear();
    let n = <&mut R as Read>::take(&mut *input, MAX_LINE as u64 + 1).read_until(b'\n', line)?;
    if n == 0 {
        return Ok(false);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE {
        let mut rest = Vec::new();
        loop {
            rest.clear();
            let n = <&mut R as Read>::take(&mut *input, 1 << 16).read_until(b'\n', &mut rest)?;
            if n == 0 || rest.last() == Some(&b'\n') {
                break;
            }
        }
    }
    Ok(true)
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
