//! `vmm study share`: host memory of N VMs vs N with template sharing (the default), without it
//! (`--share none`) and with KSM (`--share none --ksm`). Each run is a child `vmm`; its host
//! memory is the proportional set size (`Pss` of `/proc/PID/smaps_rollup`: a page shared by k
//! mappings counts 1/k, so shared template pages and KSM-merged pages count once), sampled every
//! 100 ms; the figure is the highest sample (the VMs at their fullest).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `vmm study share`.
#[derive(Debug, clap::Args)]
pub struct ShareArgs {
    /// Numbers of VMs, as A..B (inclusive) or one number.
    #[arg(long, value_name = "A..B", default_value = "1..4", value_parser = super::parse_range)]
    pub vms: (usize, usize),
    /// The task each VM runs (one vCPU); a read-only task keeps template pages shared. Random
    /// reads touch the whole set in the first iteration and the many iterations keep the VMs
    /// running side by side at their full footprint long enough to be sampled (with 20
    /// iterations a VM ran 0.2 s and one could end, freeing its pages, before another had
    /// read its set).
    #[arg(long, value_name = "SPEC", default_value = "read 32 R 200000 500")]
    pub workload: crate::workload::TaskSpec,
    /// Also measure KSM (turns /sys/kernel/mm/ksm/run on for those runs, and back after).
    #[arg(long)]
    pub ksm: bool,
    /// Recorded in the summary (the workload's pattern is fixed by its spec).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory.
    #[arg(long, value_name = "DIR", default_value = "vmm-study")]
    pub out: PathBuf,
}

/// The ways of running N VMs that are compared.
pub const MODES: [&str; 3] = ["template", "none", "ksm"];

/// One run's host memory.
#[derive(Clone, Debug)]
pub struct ShareRun {
    /// "template", "none" or "ksm".
    pub mode: &'static str,
    /// VMs.
    pub vms: usize,
    /// Host memory (Pss) in bytes.
    pub bytes: u64,
}

/// How often a run's Pss is sampled (its peak is the run's figure).
const PSS_PERIOD: Duration = Duration::from_millis(20);

fn pss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn run_one(args: &ShareArgs, mode: &'static str, n: usize) -> Result<ShareRun> {
    let spec = args.workload.to_string();
    let mut cmd = Command::new(std::env::current_exe().context("cannot find the vmm binary")?);
    cmd.args(["--workload", &spec, "--vms", &n.to_string()]);
    match mode {
        "template" => cmd.args(["--share", "template"]),
        "none" => cmd.args(["--share", "none"]),
        _ => cmd.args(["--share", "none", "--ksm"]),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start vmm")?;
    let pid = child.id();
    let mut last = 0;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(b) = pss_bytes(pid) {
            last = last.max(b);
        }
        std::thread::sleep(PSS_PERIOD);
    };
    if status.code() != Some(0) {
        bail!("{mode} N={n}: vmm ended with {status}");
    }
    Ok(ShareRun {
        mode,
        vms: n,
        bytes: last,
    })
}

/// Sets KSM's run flag, returning what it was.
fn ksm_run(value: &str) -> Option<String> {
    let path = "/sys/kernel/mm/ksm/run";
    let before = std::fs::read_to_string(path).ok()?.trim().to_string();
    std::fs::write(path, value).ok()?;
    Some(before)
}

/// Saving per VM of `mode` against `none` at the largest N: (none − mode) / N.
pub fn saving_per_vm(runs: &[ShareRun], mode: &str) -> Option<f64> {
    let n = runs.iter().map(|r| r.vms).max()?;
    let at = |m: &str| {
        runs.iter()
            .find(|r| r.mode == m && r.vms == n)
            .map(|r| r.bytes)
    };
    Some((at("none")? as f64 - at(mode)? as f64) / n as f64)
}

fn write_csv(out: &Path, runs: &[ShareRun], seed: u64) -> Result<PathBuf> {
    let path = out.join("share.csv");
    let mut f = std::fs::File::create(&path)?;
    writeln!(f, "mode,vms,host_bytes,seed")?;
    for r in runs {
        writeln!(f, "{},{},{},{seed}", r.mode, r.vms, r.bytes)?;
    }
    Ok(path)
}

/// Runs `vmm study share`.
pub fn run(args: &ShareArgs) -> Result<i32> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let (a, b) = args.vms;
    let modes: Vec<&'static str> = MODES
        .iter()
        .copied()
        .filter(|m| args.ksm || *m != "ksm")
        .collect();
    let total = modes.len() * (b - a + 1);
    let mut runs = Vec::new();
    let mut done = 0;
    for mode in &modes {
        let restore = (*mode == "ksm").then(|| ksm_run("1")).flatten();
        for n in a..=b {
            super::progress(done, total, &format!("{mode}: {n} VM(s)"));
            let run = run_one(args, mode, n);
            done += 1;
            match run {
                Ok(r) => runs.push(r),
                Err(e) => {
                    if let Some(before) = &restore {
                        ksm_run(before);
                    }
                    return Err(e);
                }
            }
        }
        if let Some(before) = restore {
            ksm_run(&before);
        }
    }
    super::progress(total, total, "done");
    eprintln!();
    let csv = write_csv(&args.out, &runs, args.seed)?;
    println!(
        "  N {}",
        modes
            .iter()
            .map(|m| format!("{m:>10} MiB"))
            .collect::<String>()
    );
    for n in a..=b {
        let cells: String = modes
            .iter()
            .map(|m| {
                runs.iter()
                    .find(|r| r.mode == *m && r.vms == n)
                    .map_or("-".to_string(), |r| {
                        format!("{:>14.1}", r.bytes as f64 / 1048576.0)
                    })
            })
            .collect();
        println!("{n:>3} {cells}");
    }
    for m in modes.iter().filter(|m| **m != "none") {
        if let Some(s) = saving_per_vm(&runs, m) {
            println!(
                "saving per VM with {m} (vs none, N={b}): {:.1} MiB",
                s / 1048576.0
            );
        }
    }
    let plots = super::plot::share_plots(&args.out, &runs, &modes)?;
    println!("{}", csv.display());
    for p in plots {
        println!("{}", p.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saving_is_per_vm_at_the_largest_n() {
        let r = |mode, vms, mib: u64| ShareRun {
            mode,
            vms,
            bytes: mib << 20,
        };
        let runs = [
            r("none", 1, 40),
            r("template", 1, 40),
            r("none", 4, 136),
            r("template", 4, 40),
        ];
        assert_eq!(saving_per_vm(&runs, "template"), Some(24.0 * 1048576.0));
        assert_eq!(saving_per_vm(&runs, "ksm"), None);
    }
}
