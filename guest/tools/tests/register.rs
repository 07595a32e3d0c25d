//! `register`: commands go to a plain `status` file standing in for the driver's (`--proc DIR`
//! or `MIRRORBALL_PROC_DIR`); bad input and a missing driver give one line and a failure.

mod common;

use common::*;

const REGISTER: &str = env!("CARGO_BIN_EXE_register");

fn status_dir(name: &str) -> Scratch {
    let dir = Scratch::new(name);
    std::fs::write(dir.path("status"), "").unwrap();
    dir
}

#[test]
fn writes_r_and_u_lines() {
    let dir = status_dir("reg");
    let proc_dir = dir.0.to_str().unwrap();
    let out = run(REGISTER, &["--proc", proc_dir, "R", "123"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.path("status")).unwrap(),
        "R 123\n"
    );

    // The environment variable names the directory too; one line per pid, in order.
    let out = run(
        REGISTER,
        &["U", "123", "9"],
        &[("MIRRORBALL_PROC_DIR", &dir.0)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.path("status")).unwrap(),
        "R 123\nU 123\nU 9\n"
    );
}

#[test]
fn lists_the_status_file() {
    let dir = status_dir("list");
    std::fs::write(dir.path("status"), "123 0 process work\n").unwrap();
    let out = run(REGISTER, &["list"], &[("MIRRORBALL_PROC_DIR", &dir.0)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "123 0 process work\n");
}

#[test]
fn bad_input_is_a_usage_error() {
    let dir = status_dir("bad");
    let proc_dir = dir.0.to_str().unwrap();
    for args in [
        &["R", "abc"][..],
        &["R", "12", "x"],
        &["R", "0"],
        &["R"],
        &["X", "1"],
        &[],
    ] {
        let mut all = vec!["--proc", proc_dir];
        all.extend_from_slice(args);
        let out = run(REGISTER, &all, &[]);
        assert_one_line_error(&out, 2, "");
    }
    // Nothing was sent: every pid is checked first.
    assert_eq!(std::fs::read_to_string(dir.path("status")).unwrap(), "");
    let out = run(REGISTER, &["--proc", proc_dir, "R", "abc"], &[]);
    assert_one_line_error(&out, 2, "bad pid \"abc\"");
}

#[test]
fn missing_driver_is_one_line() {
    let dir = Scratch::new("absent");
    let out = run(REGISTER, &["R", "1"], &[("MIRRORBALL_PROC_DIR", &dir.0)]);
    assert_one_line_error(&out, 1, "is the mirrorball driver loaded?");
    let out = run(REGISTER, &["list"], &[("MIRRORBALL_PROC_DIR", &dir.0)]);
    assert_one_line_error(&out, 1, "is the mirrorball driver loaded?");
}

#[test]
fn refused_writes_are_reported_per_pid() {
    // A status "file" that refuses writes: a directory named `status` gives EISDIR on open.
    let dir = Scratch::new("refused");
    std::fs::create_dir(dir.path("status")).unwrap();
    let out = run(REGISTER, &["R", "5"], &[("MIRRORBALL_PROC_DIR", &dir.0)]);
    assert_one_line_error(&out, 1, "status");
}
