//! Keeps `guest/linux/mirrorball_abi.h` and the Rust definitions in sync: the header's
//! `#define MB_*` constants and `_Static_assert` lines must state exactly the Rust values, and —
//! when `gcc` is available — a C program built with the header must report the same sizes,
//! offsets and constants as Rust.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use mirrorball_profiler_abi::desc::{ConstDesc, StructDesc};
use mirrorball_profiler_abi::{CONSTANTS, STRUCTS};

fn header_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/linux")
}

fn header_text() -> String {
    let path = header_dir().join("mirrorball_abi.h");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A C integer literal: decimal or hex, with optional `U`/`L` suffixes.
fn parse_c_int(token: &str) -> Option<u64> {
    let t = token.trim_end_matches(['u', 'U', 'l', 'L']);
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// `#define MB_NAME value` lines (object-like macros named `MB_*`).
fn header_constants(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix("#define ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let name = parts.next().unwrap_or("");
        if !name.starts_with("MB_") {
            continue;
        }
        assert!(
            !name.contains('('),
            "function-like macro {name} in the ABI header"
        );
        let token = parts
            .next()
            .unwrap_or_else(|| panic!("{name} has no value"));
        let value = parse_c_int(token)
            .unwrap_or_else(|| panic!("{name}: {token} is not a C integer literal"));
        assert!(
            out.insert(name.to_string(), value).is_none(),
            "{name} defined twice"
        );
    }
    out
}

#[derive(Default, Debug)]
struct Asserts {
    /// `sizeof(struct x) == n`
    sizes: BTreeMap<String, usize>,
    /// `offsetof(struct x, f) == n`
    offsets: BTreeMap<(String, String), usize>,
    /// `sizeof(((const struct x *)0)->f) == n`
    field_sizes: BTreeMap<(String, String), usize>,
}

/// The `_Static_assert(... == N, ...)` lines.
fn header_asserts(text: &str) -> Asserts {
    let mut a = Asserts::default();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("_Static_assert(") else {
            continue;
        };
        let (cond, _) = rest
            .rsplit_once(", \"")
            .expect("_Static_assert(cond, \"msg\")");
        let (lhs, rhs) = cond
            .split_once("==")
            .unwrap_or_else(|| panic!("not an equality: {line}"));
        let n: usize = rhs
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let lhs = lhs.trim();
        let dup = if let Some(args) = lhs
            .strip_prefix("offsetof(")
            .and_then(|s| s.strip_suffix(')'))
        {
            let (ty, field) = args.split_once(',').unwrap();
            a.offsets.insert((ty.trim().into(), field.trim().into()), n)
        } else if let Some(inner) = lhs.strip_prefix("sizeof(((const ") {
            // sizeof(((const struct x *)0)->f)
            let (ty, rest) = inner
                .split_once(" *)0)->")
                .unwrap_or_else(|| panic!("{line}"));
            let field = rest.strip_suffix(')').unwrap_or_else(|| panic!("{line}"));
            a.field_sizes.insert((ty.trim().into(), field.into()), n)
        } else if let Some(ty) = lhs
            .strip_prefix("sizeof(")
            .and_then(|s| s.strip_suffix(')'))
        {
            a.sizes.insert(ty.trim().into(), n)
        } else {
            panic!("unrecognised assertion: {line}");
        };
        assert!(dup.is_none(), "assertion repeated: {line}");
    }
    a
}

fn rust_constants() -> BTreeMap<String, u64> {
    CONSTANTS
        .iter()
        .map(|c: &ConstDesc| (c.c_name.to_string(), c.value))
        .collect()
}

/// The assertion block the header should contain (printed when the test fails, to paste).
fn expected_asserts() -> String {
    let mut s = String::new();
    for st in STRUCTS {
        s += &format!(
            "_Static_assert(sizeof({0}) == {1}, \"{0} size\");\n",
            st.c_name, st.size
        );
        for f in st.fields {
            s += &format!(
                "_Static_assert(offsetof({0}, {1}) == {2}, \"{0}.{1}\");\n\
                 _Static_assert(sizeof(((const {0} *)0)->{1}) == {3}, \"{0}.{1} size\");\n",
                st.c_name, f.name, f.offset, f.size
            );
        }
    }
    s
}

#[test]
fn header_constants_match_rust() {
    let header = header_constants(&header_text());
    let rust = rust_constants();
    for (name, value) in &rust {
        match header.get(name) {
            Some(v) => assert_eq!(v, value, "{name}: header {v:#x}, Rust {value:#x}"),
            None => panic!("{name} = {value:#x} is missing from the header"),
        }
    }
    for name in header.keys() {
        assert!(
            rust.contains_key(name),
            "{name} is in the header but not in Rust (abi::CONSTANTS)"
        );
    }
    println!("{} constants agree", rust.len());
}

#[test]
fn header_layout_assertions_match_rust() {
    let a = header_asserts(&header_text());
    let mut problems = Vec::new();
    let mut expected = Asserts::default();
    for st in STRUCTS {
        let st: &StructDesc = st;
        expected.sizes.insert(st.c_name.into(), st.size);
        for f in st.fields {
            expected
                .offsets
                .insert((st.c_name.into(), f.name.into()), f.offset);
            expected
                .field_sizes
                .insert((st.c_name.into(), f.name.into()), f.size);
        }
    }
    fn compare<K: Ord + std::fmt::Debug>(
        problems: &mut Vec<String>,
        what: &str,
        header: &BTreeMap<K, usize>,
        rust: &BTreeMap<K, usize>,
    ) {
        for (k, v) in rust {
            match header.get(k) {
                Some(h) if h == v => {}
                Some(h) => problems.push(format!("{what} {k:?}: header {h}, Rust {v}")),
                None => problems.push(format!("{what} {k:?} = {v}: no assertion in the header")),
            }
        }
        for k in header.keys() {
            if !rust.contains_key(k) {
                problems.push(format!(
                    "{what} {k:?}: asserted in the header, unknown to Rust"
                ));
            }
        }
    }
    compare(&mut problems, "size", &a.sizes, &expected.sizes);
    compare(&mut problems, "offset", &a.offsets, &expected.offsets);
    compare(
        &mut problems,
        "field size",
        &a.field_sizes,
        &expected.field_sizes,
    );
    assert!(
        problems.is_empty(),
        "header and Rust disagree:\n  {}\n\nexpected assertion block:\n{}",
        problems.join("\n  "),
        expected_asserts()
    );
    println!(
        "{} structures, {} field offsets and sizes agree",
        expected.sizes.len(),
        expected.offsets.len()
    );
}

#[test]
fn parsers_catch_one_sided_changes() {
    // A changed value on either side is a mismatch (guards the parsers themselves).
    let text = header_text();
    let changed = text.replacen(
        "#define MB_HEADER_SIZE 256",
        "#define MB_HEADER_SIZE 320",
        1,
    );
    assert_ne!(
        header_constants(&changed)["MB_HEADER_SIZE"],
        rust_constants()["MB_HEADER_SIZE"]
    );
    let changed = text.replacen(
        "offsetof(struct mb_guest_sample, min_flt) == 24",
        "offsetof(struct mb_guest_sample, min_flt) == 32",
        1,
    );
    let key = ("struct mb_guest_sample".to_string(), "min_flt".to_string());
    assert_eq!(header_asserts(&text).offsets[&key], 24);
    assert_eq!(header_asserts(&changed).offsets[&key], 32);
    assert_eq!(parse_c_int("0x8000000000000000ULL"), Some(1 << 63));
    assert_eq!(parse_c_int("0xffffffffU"), Some(0xffff_ffff));
    assert_eq!(parse_c_int("16"), Some(16));
}

fn gcc_available() -> bool {
    Command::new("gcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mirrorball-abi-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A C program printing, with the header's own definitions, what Rust says the ABI is.
fn probe_program() -> String {
    let mut c = String::from(
        "#include <stdio.h>\n#include \"mirrorball_abi.h\"\n\
         #define FSIZE(t, f) sizeof(((t *)0)->f)\nint main(void) {\n",
    );
    for st in STRUCTS {
        c += &format!(
            "  printf(\"{0} %zu %zu\\n\", sizeof({0}), _Alignof({0}));\n",
            st.c_name
        );
        for f in st.fields {
            c += &format!(
                "  printf(\"{0}.{1} %zu %zu\\n\", offsetof({0}, {1}), FSIZE({0}, {1}));\n",
                st.c_name, f.name
            );
        }
    }
    for k in CONSTANTS {
        c += &format!(
            "  printf(\"{0} %llu\\n\", (unsigned long long)({0}));\n",
            k.c_name
        );
    }
    c + "  return 0;\n}\n"
}

fn rust_probe_output() -> String {
    let mut s = String::new();
    for st in STRUCTS {
        s += &format!("{} {} {}\n", st.c_name, st.size, st.align);
        for f in st.fields {
            s += &format!("{}.{} {} {}\n", st.c_name, f.name, f.offset, f.size);
        }
    }
    for k in CONSTANTS {
        s += &format!("{} {}\n", k.c_name, k.value);
    }
    s
}

#[test]
fn gcc_agrees_with_rust() {
    if !gcc_available() {
        println!("skipped: gcc is not available");
        return;
    }
    let dir = scratch_dir("probe");
    let src = dir.join("probe.c");
    let exe = dir.join("probe");
    std::fs::write(&src, probe_program()).unwrap();
    let out = Command::new("gcc")
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
            "-O0",
            "-I",
        ])
        .arg(header_dir())
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let c = String::from_utf8(run.stdout).unwrap();
    let rust = rust_probe_output();
    for (cl, rl) in c.lines().zip(rust.lines()) {
        assert_eq!(cl, rl, "C (left) and Rust (right) disagree");
    }
    assert_eq!(c.lines().count(), rust.lines().count());
    std::fs::remove_dir_all(&dir).ok();
    println!(
        "gcc: {} lines of sizes, offsets and constants agree",
        c.lines().count()
    );
}

#[test]
fn gcc_compiles_the_header_in_kernel_and_user_mode() {
    if !gcc_available() {
        println!("skipped: gcc is not available");
        return;
    }
    let header = header_dir().join("mirrorball_abi.h");
    // User space: <stdint.h> types, strict C11. Kernel: the __u64 types of <linux/types.h> (the
    // user-space copy of the kernel's uapi header; its <linux/stddef.h> lacks offsetof, which
    // the kernel's own provides, hence the -include).
    let modes: [&[&str]; 2] = [
        &["-std=c11", "-Wpedantic"],
        &["-std=gnu11", "-D__KERNEL__", "-include", "stddef.h"],
    ];
    for flags in modes {
        let out = Command::new("gcc")
            .args(flags)
            .args(["-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-x", "c"])
            .arg(&header)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gcc {flags:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
