//! The nested-SVM test bed (`resources/nested/run.sh`) booted once per test binary, and its
//! results: each test inside L1 left a result line (`NAME rc=N secs=S`) and a directory of files.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use crate::common::{reference_guest, text, vmm_bin};

/// What one run of the test bed left.
#[derive(Debug)]
pub struct Bed {
    /// Its output directory.
    pub dir: PathBuf,
    /// Per test: (exit code inside L1, seconds).
    pub results: BTreeMap<String, (i32, f64)>,
    /// The L1 console.
    pub console: String,
    /// Wall time of the whole run.
    pub secs: f64,
}

impl Bed {
    /// The files test `name` wrote inside L1.
    pub fn files(&self, name: &str) -> PathBuf {
        self.dir.join("files").join(name)
    }

    /// A file of test `name` as text ("" when missing).
    pub fn read(&self, name: &str, file: &str) -> String {
        std::fs::read(self.files(name).join(file))
            .map(|b| text(&b))
            .unwrap_or_default()
    }

    /// Panics unless test `name` ran inside L1 and its own checks passed; returns its seconds.
    pub fn assert_passed(&self, name: &str) -> f64 {
        let Some(&(rc, secs)) = self.results.get(name) else {
            panic!(
                "{name}: no result from the test bed ({}); L1 console:\n{}",
                self.dir.display(),
                self.console
            );
        };
        assert_eq!(
            rc,
            0,
            "{name} failed inside L1 after {secs} s; its log:\n{}",
            self.read(name, "test.log")
        );
        eprintln!("nested {name}: passed in {secs} s inside L1");
        // l1-init ran it once more (a hang, or an L2 triple fault under the emulated SVM).
        let first = self.files(name).join("attempt0").join("test.log");
        if let Ok(log) = std::fs::read(&first) {
            let log = text(&log);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(3)..];
            eprintln!("nested {name}: on its second run; the first one ended: {tail:?}");
        }
        secs
    }
}

fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Boots the test bed (`run.sh` itself boots L1 again when it dies or freezes mid-way, and
/// runs a test that hung once more).
fn boot() -> Result<Bed, String> {
    if !qemu_available() {
        return Err("qemu-system-x86_64 not found (apt-get install qemu-system-x86)".into());
    }
    let (kernel, initrd) = reference_guest().map_err(|e| format!("no reference guest ({e})"))?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/nested/run.sh");
    let dir = std::env::temp_dir().join(format!("mirrorball-nested-{}", std::process::id()));
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(&dir)
        .arg("--vmm")
        .arg(vmm_bin())
        .env("MIRRORBALL_KERNEL", &kernel)
        .env("MIRRORBALL_INITRD", &initrd)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let secs = start.elapsed().as_secs_f64();
    let stderr = text(&out.stderr);
    eprintln!("nested test bed: {secs:.1} s\n{stderr}");
    // 3: the test bed cannot run here (its one-line reason is the last line of stderr).
    if out.status.code() == Some(3) {
        return Err(stderr.lines().last().unwrap_or("run.sh failed").to_string());
    }
    let console = std::fs::read(dir.join("console.log"))
        .map(|b| text(&b))
        .map_err(|e| format!("no L1 console in {}: {e}\n{stderr}", dir.display()))?;
    let mut results = BTreeMap::new();
    let lines = std::fs::read_to_string(dir.join("results.txt")).unwrap_or_default();
    for line in lines.lines() {
        // NAME rc=N secs=S
        let mut words = line.split_whitespace();
        let (Some(name), Some(rc), Some(s)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let rc = rc.trim_start_matches("rc=").parse().unwrap_or(-1);
        let s = s.trim_start_matches("secs=").parse().unwrap_or(f64::NAN);
        results.insert(name.to_string(), (rc, s));
    }
    Ok(Bed {
        dir,
        results,
        console,
        secs,
    })
}

/// The test bed, booted by the first test that asks; `None` (after printing why, or panicking
/// under CI) when it cannot run here.
pub fn bed(test: &str) -> Option<&'static Bed> {
    static BED: OnceLock<Result<Bed, String>> = OnceLock::new();
    match BED.get_or_init(boot) {
        Ok(bed) => Some(bed),
        Err(why) => {
            crate::common::skip_or_fail(test, why);
            None
        }
    }
}

/// Cells of the table rows of `vmm`'s workload summary whose first cell is a task number.
pub fn task_rows(summary: &str) -> Vec<Vec<String>> {
    summary
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|c| c.len() >= 12 && c[0].parse::<u32>().is_ok())
        .collect()
}

/// The value after `prefix` on the first console line that has it (CR stripped).
pub fn line_after<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').split_once(prefix).map(|(_, v)| v))
}
