//! `vmm study thrash` (and `vmm study share`, [`share`]): for each N of a range, runs N OS-less
//! VMs under one machine-memory budget (a child `vmm` process per N, so each run has its own
//! cgroup and swap; the VMs are template clones, the default for several VMs, also for N = 1),
//! samples the host major faults of every vCPU thread over time, and writes a CSV per run, a
//! summary CSV, plots ([`plot`]) and a terminal table.
//!
//! VMs of one child are told apart by their vCPU threads' ids: the VMs are built and started in
//! order (vm0 first), each with one vCPU, so the k-th `vcpu0` thread by id belongs to VM k.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod plot;
pub mod share;

/// `vmm study`.
#[derive(Debug, clap::Args)]
pub struct StudyArgs {
    /// Which study.
    #[command(subcommand)]
    pub study: Study,
}

/// The studies.
#[derive(Debug, clap::Subcommand)]
pub enum Study {
    /// Total work per second vs number of VMs under one machine-memory budget.
    Thrash(ThrashArgs),
    /// Host memory vs number of VMs with template sharing, without it, and with KSM.
    Share(share::ShareArgs),
}

/// `vmm study thrash`.
#[derive(Debug, clap::Args)]
pub struct ThrashArgs {
    /// Numbers of VMs, as A..B (inclusive) or one number.
    #[arg(long, value_name = "A..B", default_value = "1..4", value_parser = parse_range)]
    pub vms: (usize, usize),
    /// The budget of every run.
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::parse_size)]
    pub machine_mem: u64,
    /// The task each VM runs (one vCPU).
    #[arg(long, value_name = "SPEC")]
    pub workload: crate::workload::TaskSpec,
    /// Seed: passed to nothing random yet (the workload's access pattern is fixed by its spec),
    /// recorded in the summary so that runs can be named and repeated.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory.
    #[arg(long, value_name = "DIR", default_value = "vmm-study")]
    pub out: PathBuf,
}

/// Parses "A..B" or "N".
pub fn parse_range(text: &str) -> Result<(usize, usize), String> {
    let bad = || format!("{text:?} is not a range like 1..8");
    let (a, b) = match text.split_once("..") {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let n = text.trim().parse().map_err(|_| bad())?;
            (n, n)
        }
    };
    if a == 0 || b < a || b > crate::fleet::MAX_VMS {
        return Err(format!(
            "{text:?}: need 1 <= A <= B <= {}",
            crate::fleet::MAX_VMS
        ));
    }
    Ok((a, b))
}

/// One VM's sample: seconds since the run started, cumulative host major faults.
pub type Sample = (f64, u64);

/// What one run (N VMs) did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// VMs.
    pub vms: usize,
    /// Wall seconds of the run.
    pub seconds: f64,
    /// Workload iterations of all VMs per second.
    pub work_per_s: f64,
    /// Host major faults of all vCPU threads per second.
    pub host_majflt_per_s: f64,
    /// Guest page faults per second.
    pub guest_faults_per_s: f64,
    /// vCPU CPU time over wall time, percent of one CPU.
    pub cpu_percent: f64,
    /// Exit code of the child.
    pub exit_code: i32,
    /// Per VM: its samples.
    pub series: Vec<Vec<Sample>>,
}

/// `(tid, majflt, utime+stime ticks)` of the threads named `vcpu0` of `pid`.
fn vcpu_threads(pid: u32) -> Vec<(u32, u64)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, u64)> = entries
        .flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            if comm.trim() != "vcpu0" {
                return None;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            // Field 3 is the first after ")"; majflt is field 12.
            let majflt = after.split_whitespace().nth(12 - 3)?.parse().ok()?;
            Some((tid, majflt))
        })
        .collect();
    out.sort();
    out
}

pub(crate) fn progress(done: usize, total: usize, what: &str) {
    let width = 30;
    let filled = done * width / total.max(1);
    eprint!(
        "\r[{}{}] {done}/{total} {what:<30}",
        "#".repeat(filled),
        "-".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}

/// Runs N VMs in a child `vmm` and samples it.
fn run_one(args: &ThrashArgs, n: usize) -> Result<RunSummary> {
    let stats = args.out.join(format!("run-{n}.json"));
    let spec = args.workload.to_string();
    let mut child = Command::new(std::env::current_exe().context("cannot find the vmm binary")?)
        .args([
            "--workload",
            &spec,
            "--vms",
            &n.to_string(),
            "--share",
            "template",
        ])
        .args(["--machine-mem", &format!("{}K", args.machine_mem >> 10)])
        .arg("--stats")
        .arg(&stats)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start vmm")?;
    let pid = child.id();
    let start = Instant::now();
    let mut series: Vec<Vec<Sample>> = vec![Vec::new(); n];
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let t = start.elapsed().as_secs_f64();
        for (k, (_, majflt)) in vcpu_threads(pid).into_iter().take(n).enumerate() {
            series[k].push((t, majflt));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let seconds = start.elapsed().as_secs_f64();
    for s in &mut series {
        s.iter_mut().for_each(|p| p.0 = p.0.min(seconds));
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let code = status.code().unwrap_or(-1);
    if !status.success() {
        let how = match std::os::unix::process::ExitStatusExt::signal(&status) {
            Some(sig) => format!("was killed by signal {sig}"),
            None => format!("ended with exit code {code}"),
        };
        let last = err.lines().last().unwrap_or("").trim();
        bail!("N={n}: vmm {how}: {last}");
    }
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&stats).with_context(|| format!("{}", stats.display()))?,
    )?;
    let vms: Vec<serde_json::Value> = match doc.get("vms") {
        Some(serde_json::Value::Array(v)) => v.clone(),
        _ => vec![doc.clone()],
    };
    let (mut work, mut majflt, mut guest, mut cpu_ns, mut busy_ns) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for vm in &vms {
        for t in vm["tasks"].as_array().into_iter().flatten() {
            busy_ns = f64::max(busy_ns, t["elapsed_ns"].as_f64().unwrap_or(0.0));
            work += t["iterations"].as_f64().unwrap_or(0.0);
            guest += t["guest_min_flt"].as_f64().unwrap_or(0.0);
            majflt += t["host"]["host_maj_flt"].as_f64().unwrap_or(0.0);
            cpu_ns += t["host"]["vcpu_cpu_ns"].as_f64().unwrap_or(0.0);
        }
    }
    // Rates over the time the tasks ran (not the process start and VM building around it).
    let busy = if busy_ns > 0.0 {
        busy_ns / 1e9
    } else {
        seconds
    };
    Ok(RunSummary {
        vms: n,
        seconds: busy,
        work_per_s: work / busy,
        host_majflt_per_s: majflt / busy,
        guest_faults_per_s: guest / busy,
        cpu_percent: cpu_ns / 1e9 / busy * 100.0,
        exit_code: code,
        series,
    })
}

/// The N with the most work per second (the thrashing knee: more VMs do less).
pub fn knee(runs: &[RunSummary]) -> Option<usize> {
    runs.iter()
        .max_by(|a, b| a.work_per_s.total_cmp(&b.work_per_s))
        .map(|r| r.vms)
}

fn write_csvs(out: &Path, runs: &[RunSummary], seed: u64) -> Result<PathBuf> {
    for r in runs {
        let mut f = std::fs::File::create(out.join(format!("run-{}.csv", r.vms)))?;
        writeln!(f, "time_s,vm,host_major_faults,host_major_faults_per_s")?;
        for (vm, s) in r.series.iter().enumerate() {
            for w in s.windows(2) {
                let rate = (w[1].1.saturating_sub(w[0].1)) as f64 / (w[1].0 - w[0].0).max(1e-3);
                writeln!(f, "{:.2},vm{vm},{},{rate:.1}", w[1].0, w[1].1)?;
            }
        }
    }
    let path = out.join("summary.csv");
    let mut f = std::fs::File::create(&path)?;
    writeln!(
        f,
        "vms,seconds,work_per_s,host_major_faults_per_s,guest_faults_per_s,cpu_percent,seed"
    )?;
    for r in runs {
        writeln!(
            f,
            "{},{:.3},{:.3},{:.1},{:.1},{:.1},{seed}",
            r.vms,
            r.seconds,
            r.work_per_s,
            r.host_majflt_per_s,
            r.guest_faults_per_s,
            r.cpu_percent
        )?;
    }
    Ok(path)
}

/// Runs `vmm study …`; returns the exit code.
pub fn run(args: &StudyArgs) -> Result<i32> {
    let t = match &args.study {
        Study::Thrash(t) => t,
        Study::Share(s) => return share::run(s),
    };
    std::fs::create_dir_all(&t.out)
        .with_context(|| format!("cannot create {}", t.out.display()))?;
    let (a, b) = t.vms;
    let total = b - a + 1;
    let mut runs = Vec::new();
    for (i, n) in (a..=b).enumerate() {
        progress(i, total, &format!("running {n} VM(s)"));
        runs.push(run_one(t, n)?);
    }
    progress(total, total, "done");
    eprintln!();
    let summary = write_csvs(&t.out, &runs, t.seed)?;
    let knee = knee(&runs);
    println!("  N    work/s  host majflt/s  guest flt/s   CPU %");
    for r in &runs {
        let mark = if Some(r.vms) == knee { " <- knee" } else { "" };
        println!(
            "{:>3} {:>9.2} {:>14.1} {:>12.1} {:>7.1}{mark}",
            r.vms, r.work_per_s, r.host_majflt_per_s, r.guest_faults_per_s, r.cpu_percent
        );
    }
    let plots = plot::plots(&t.out, &runs, knee)?;
    println!("{}", summary.display());
    for p in plots {
        println!("{}", p.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("1..8"), Ok((1, 8)));
        assert_eq!(parse_range("3"), Ok((3, 3)));
        for bad in ["0..2", "4..2", "x", "1..999"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn knee_is_the_most_work() {
        let run = |vms, work_per_s| RunSummary {
            vms,
            work_per_s,
            ..Default::default()
        };
        assert_eq!(knee(&[run(1, 1.0), run(2, 1.8), run(3, 0.7)]), Some(2));
        assert_eq!(knee(&[]), None);
    }
}
