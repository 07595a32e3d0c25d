//! The CSV encoding of rows: one header line, then one line per row with the union of the kinds'
//! columns ([`CSV_COLUMNS`]). A column table per kind names the CSV column of each field and
//! drives both writing a row ([`Row::to_csv`]) and parsing one back (what `vmm plot` reads).

use std::collections::HashMap;
use std::str::FromStr;

use super::rows::{GuestRow, HostRow, LostRow, MemoryRow, Row};

/// CSV columns, in order.
pub const CSV_COLUMNS: [&str; 34] = [
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
    "slot_flags",
    "switches",
    "attribution",
    "cow_breaks",
    "ram_pages",
    "shared_pages",
    "private_pages",
    "merged_pages",
    "vcpu_wait_ns",
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

/// One CSV column of a row kind: its name, and how to write the field it holds as text and parse
/// it back. A kind's column table drives both [`Row::to_csv`] and the parsing of CSV records.
struct Column<R> {
    name: &'static str,
    get: fn(&R) -> String,
    set: fn(&mut R, &str) -> Result<(), String>,
}

/// A field from its CSV text; an empty field is the default (0, or an empty string).
fn parse_field<T: FromStr + Default>(name: &str, text: &str) -> Result<T, String> {
    if text.is_empty() {
        return Ok(T::default());
    }
    text.parse()
        .map_err(|_| format!("column {name}: {text:?} is not a number"))
}

/// The column table of one row kind: `"column" => field` for each of its fields.
macro_rules! columns {
    ($row:ty { $($name:literal => $field:ident),* $(,)? }) => {
        &[$(Column::<$row> {
            name: $name,
            get: |row| row.$field.to_string(),
            set: |row, text| {
                row.$field = parse_field($name, text)?;
                Ok(())
            },
        }),*]
    };
}

const GUEST_COLUMNS: &[Column<GuestRow>] = columns!(GuestRow {
    "vm" => vm,
    "seq" => seq,
    "read_ns" => read_ns,
    "timestamp_ns" => timestamp_ns,
    "task_id" => task_id,
    "pid" => pid,
    "comm" => comm,
    "cpu" => cpu,
    "flags" => flags,
    "min_flt" => min_flt,
    "maj_flt" => maj_flt,
    "utime_ns" => utime_ns,
    "stime_ns" => stime_ns,
});

/// `vcpu` goes in `cpu` and `attr_flags` in `flags`.
const HOST_COLUMNS: &[Column<HostRow>] = columns!(HostRow {
    "vm" => vm,
    "seq" => seq,
    "read_ns" => read_ns,
    "timestamp_ns" => timestamp_ns,
    "task_id" => task_id,
    "pid" => pid,
    "comm" => comm,
    "cpu" => vcpu,
    "flags" => attr_flags,
    "interval_ns" => interval_ns,
    "pf_taken" => pf_taken,
    "pf_fixed" => pf_fixed,
    "exits" => exits,
    "host_min_flt" => host_min_flt,
    "host_maj_flt" => host_maj_flt,
    "vcpu_utime_ns" => vcpu_utime_ns,
    "vcpu_stime_ns" => vcpu_stime_ns,
    "guest_switch_count" => guest_switch_count,
    "slot_flags" => slot_flags,
    "switches" => switches,
    "attribution" => attribution,
    "cow_breaks" => cow_breaks,
    "vcpu_wait_ns" => vcpu_wait_ns,
});

const MEMORY_COLUMNS: &[Column<MemoryRow>] = columns!(MemoryRow {
    "vm" => vm,
    "read_ns" => read_ns,
    "timestamp_ns" => timestamp_ns,
    "flags" => flags,
    "ram_pages" => ram_pages,
    "shared_pages" => shared_pages,
    "private_pages" => private_pages,
    "merged_pages" => merged_pages,
    "cow_breaks" => cow_breaks,
});

const LOST_COLUMNS: &[Column<LostRow>] = columns!(LostRow {
    "vm" => vm,
    "ring" => ring,
    "seq" => seq,
    "count" => count,
    "read_ns" => read_ns,
});

/// The CSV line of a row of kind `kind`: every column of [`CSV_COLUMNS`], empty where the kind's
/// table has none.
fn csv_line<R>(kind: &str, row: &R, columns: &[Column<R>]) -> String {
    let mut line = String::new();
    for (i, name) in CSV_COLUMNS.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if *name == "kind" {
            csv_field(&mut line, kind);
        } else if let Some(column) = columns.iter().find(|c| c.name == *name) {
            csv_field(&mut line, &(column.get)(row));
        }
    }
    line.push('\n');
    line
}

/// A row of a kind from its columns' text (`text` gives "" for a column the line lacks).
fn parse_columns<'t, R: Default>(
    columns: &[Column<R>],
    text: impl Fn(&str) -> &'t str,
) -> Result<R, String> {
    let mut row = R::default();
    for column in columns {
        (column.set)(&mut row, text(column.name))?;
    }
    Ok(row)
}

impl Row {
    /// The CSV line of this row (empty for `meta`, which CSV does not carry).
    pub fn to_csv(&self) -> String {
        match self {
            Row::Meta(_) => String::new(),
            Row::Guest(g) => csv_line("guest", g, GUEST_COLUMNS),
            Row::Host(h) => csv_line("host", h, HOST_COLUMNS),
            Row::Lost(l) => csv_line("lost", l, LOST_COLUMNS),
            Row::Memory(m) => csv_line("memory", m, MEMORY_COLUMNS),
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

pub(crate) fn row_from_csv(
    header: &HashMap<String, usize>,
    fields: &[String],
) -> Result<Row, String> {
    let get = |name: &str| -> &str {
        header
            .get(name)
            .and_then(|&i| fields.get(i))
            .map_or("", |s| s.as_str())
    };
    Ok(match get("kind") {
        "guest" => Row::Guest(parse_columns(GUEST_COLUMNS, get)?),
        "host" => Row::Host(parse_columns(HOST_COLUMNS, get)?),
        "lost" => Row::Lost(parse_columns(LOST_COLUMNS, get)?),
        "memory" => Row::Memory(parse_columns(MEMORY_COLUMNS, get)?),
        other => return Err(format!("unknown kind {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::record::parse_record;

    /// Rows with every field set, each to a different value.
    fn full_rows() -> [Row; 4] {
        [
            Row::Guest(GuestRow {
                vm: "1-0".into(),
                seq: 1,
                read_ns: 2,
                timestamp_ns: 3,
                task_id: 4,
                pid: 5,
                comm: "a,\"b\"".into(),
                cpu: 6,
                flags: 7,
                min_flt: 8,
                maj_flt: 9,
                utime_ns: 10,
                stime_ns: 11,
            }),
            Row::Host(HostRow {
                vm: "2-1".into(),
                seq: 21,
                read_ns: 22,
                timestamp_ns: 23,
                task_id: 24,
                pid: 25,
                comm: "w".into(),
                vcpu: 26,
                attr_flags: 27,
                interval_ns: 28,
                pf_taken: 29,
                pf_fixed: 30,
                exits: 31,
                host_min_flt: 32,
                host_maj_flt: 33,
                vcpu_utime_ns: 34,
                vcpu_stime_ns: 35,
                guest_switch_count: 36,
                slot_flags: 2,
                switches: 37,
                attribution: "exact".into(),
                cow_breaks: 38,
                vcpu_wait_ns: 39,
            }),
            Row::Lost(LostRow {
                vm: "3-2".into(),
                ring: "host".into(),
                seq: 41,
                count: 42,
                read_ns: 43,
            }),
            Row::Memory(MemoryRow {
                vm: "4-0".into(),
                read_ns: 51,
                timestamp_ns: 52,
                flags: 1,
                ram_pages: 53,
                shared_pages: 54,
                private_pages: 55,
                merged_pages: 56,
                cow_breaks: 57,
            }),
        ]
    }

    #[test]
    fn csv_lines_put_every_field_in_its_column() {
        let lines: Vec<String> = full_rows().iter().map(Row::to_csv).collect();
        assert_eq!(
            lines,
            [
                "guest,1-0,1,2,3,4,5,\"a,\"\"b\"\"\",6,7,8,9,10,11,,,,,,,,,,,,,,,,,,,,\n",
                "host,2-1,21,22,23,24,25,w,26,27,,,,,28,29,30,31,32,33,34,35,36,,,2,37,exact,38,,,,,39\n",
                "lost,3-2,41,43,,,,,,,,,,,,,,,,,,,,42,host,,,,,,,,,\n",
                "memory,4-0,,51,52,,,,,1,,,,,,,,,,,,,,,,,,,57,53,54,55,56,\n",
            ]
        );
        let mut csv = CSV_COLUMNS.join(",") + "\n";
        csv.extend(lines);
        let rec = parse_record(csv.as_bytes(), Path::new("t")).unwrap();
        assert_eq!(rec.rows, full_rows());
        assert_eq!(rec.bad_lines, 0);
    }

    #[test]
    fn column_tables_name_csv_columns_once_and_cover_them() {
        let tables: [Vec<&str>; 4] = [
            GUEST_COLUMNS.iter().map(|c| c.name).collect(),
            HOST_COLUMNS.iter().map(|c| c.name).collect(),
            LOST_COLUMNS.iter().map(|c| c.name).collect(),
            MEMORY_COLUMNS.iter().map(|c| c.name).collect(),
        ];
        for table in &tables {
            for (i, name) in table.iter().enumerate() {
                assert!(CSV_COLUMNS.contains(name), "{name} is not a CSV column");
                assert!(!table[..i].contains(name), "{name} twice in one table");
            }
        }
        for name in CSV_COLUMNS {
            assert!(
                name == "kind" || tables.iter().any(|t| t.contains(&name)),
                "no kind has the CSV column {name}"
            );
        }
    }
}
