//! Benchmark 5 (opt-in): a Linux kernel from process start to `Run /init as init process` on its
//! serial console, through the VMM and through QEMU, with the same kernel command line.
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmm::arch::x86_64::cpuid::HostKind;

use super::report::{Row, Target};

/// QEMU options besides `-cpu`, kernel, initrd and command line: same RAM and vCPUs as the VMM.
const QEMU_ARGS: [&str; 7] = [
    "-enable-kvm",
    "-m",
    "256",
    "-smp",
    "1",
    "-nographic",
    "-no-reboot",
];
/// The console line both runs are timed to.
const INIT_LINE: &str = "Run /init as init process";
/// Where the kernel echoes its command line.
const CMDLINE_PREFIX: &str = "Command line: ";
/// The command line asked of the VMM (it appends what the host needs, e.g. on PVM).
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// What `--linux` asks for.
pub struct LinuxArgs {
    /// Kernel as given.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel for the VMM, if not derived from `kernel`.
    pub vmm_kernel: Option<PathBuf>,
    /// Kernel for QEMU, if not derived from `kernel`.
    pub qemu_kernel: Option<PathBuf>,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// QEMU `-cpu` model; `None` for QEMU's default, except on PVM (see [`qemu_cpu`]).
    pub qemu_cpu: Option<String>,
    /// Longest wait for each boot.
    pub timeout: Duration,
}

/// How far one boot got.
struct Boot {
    /// Process start to the init line.
    to_init: Duration,
    /// The kernel's `Command line:` echo, if seen.
    cmdline: Option<String>,
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"\x7fELF")
}

/// The VMM boots an ELF vmlinux (its direct 64-bit entry, no decompressor) when one is given or
/// sits next to the given bzImage; QEMU needs the bzImage (`-kernel` does not take a vmlinux
/// without a PVH note), found the same way.
fn pick_kernels(args: &LinuxArgs) -> (PathBuf, PathBuf) {
    let sibling = |name: &str| args.kernel.parent().map(|d| d.join(name));
    let given_is_elf = is_elf(&args.kernel);
    let ours = args.vmm_kernel.clone().unwrap_or_else(|| {
        if given_is_elf {
            return args.kernel.clone();
        }
        sibling("vmlinux")
            .filter(|p| is_elf(p))
            .unwrap_or_else(|| args.kernel.clone())
    });
    let qemu = args.qemu_kernel.clone().unwrap_or_else(|| {
        if !given_is_elf {
            return args.kernel.clone();
        }
        sibling("bzImage")
            .filter(|p| p.exists())
            .unwrap_or_else(|| args.kernel.clone())
    });
    (ours, qemu)
}

/// Runs `cmd` until its stdout shows [`INIT_LINE`], then kills it.
fn boot_to_init(mut cmd: Command, timeout: Duration) -> Result<Boot> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if tx.send(text).is_err() {
                break;
            }
            line.clear();
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut cmdline = None;
    let mut tail: Vec<String> = Vec::new();
    let outcome = loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains(INIT_LINE) {
                    break Ok(start.elapsed());
                }
                if let Some(at) = line.find(CMDLINE_PREFIX) {
                    cmdline.get_or_insert_with(|| line[at + CMDLINE_PREFIX.len()..].to_string());
                }
                tail.push(line);
                if tail.len() > 8 {
                    tail.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!("no {INIT_LINE:?} within {timeout:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(format!("console closed before {INIT_LINE:?}"))
            }
        }
    };
    let _ = child.kill();
    let status = child.wait();
    let stderr_text = err_reader.join().unwrap_or_default();
    match outcome {
        Ok(to_init) => Ok(Boot { to_init, cmdline }),
        Err(why) => {
            let err_tail: Vec<&str> = stderr_text.lines().rev().take(4).collect();
            bail!(
                "{why} ({status:?}); last console lines: {:?}; stderr: {:?}",
                tail,
                err_tail
            )
        }
    }
}

fn qemu_version(qemu: &Path) -> Result<String> {
    let out = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (install it with `apt-get install -y qemu-system-x86`)",
                qemu.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// QEMU's `-cpu`: as asked, else on a PVM host `qemu64,vendor=GenuineIntel` — the vendor the
/// VMM's CPUID shows there (an AMD vendor makes Linux run the x87 `fnclex` workaround, which
/// PVM's instruction emulator cannot execute) — else QEMU's default.
fn qemu_cpu(args: &LinuxArgs) -> Option<String> {
    args.qemu_cpu.clone().or_else(|| {
        (HostKind::detect() == HostKind::Pvm).then(|| "qemu64,vendor=GenuineIntel".to_string())
    })
}

const ID: &str = "linux_boot_to_init";
const NAME: &str = "Linux: process start → `Run /init as init process`";

/// Benchmark 5: ours first (its console shows the full command line), then QEMU with the same.
pub fn run(vmm: &Path, args: &LinuxArgs) -> Result<Vec<Row>> {
    let (ours_kernel, qemu_kernel) = pick_kernels(args);
    eprintln!(
        "linux: booting {} through the VMM (up to {:?})...",
        ours_kernel.display(),
        args.timeout
    );
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel")
        .arg(&ours_kernel)
        .arg("--initrd")
        .arg(&args.initrd)
        .args(["--cmdline", BASE_CMDLINE]);
    let ours = match boot_to_init(cmd, args.timeout) {
        Ok(boot) => boot,
        Err(e) => {
            let why = format!("the VMM did not reach init: {e:#}");
            return Ok(vec![Row::skipped(5, ID, NAME, Target::None, why)]);
        }
    };
    let cmdline = ours.cmdline.clone().unwrap_or_else(|| BASE_CMDLINE.into());
    eprintln!(
        "linux: VMM reached init in {:.1} s; booting {} through QEMU...",
        ours.to_init.as_secs_f64(),
        qemu_kernel.display()
    );
    let cpu = qemu_cpu(args);
    let qemu = qemu_version(&args.qemu).and_then(|version| {
        let mut cmd = Command::new(&args.qemu);
        cmd.args(QEMU_ARGS);
        if let Some(cpu) = &cpu {
            cmd.args(["-cpu", cpu]);
        }
        cmd.arg("-kernel")
            .arg(&qemu_kernel)
            .arg("-initrd")
            .arg(&args.initrd)
            .arg("-append")
            .arg(&cmdline);
        boot_to_init(cmd, args.timeout).map(|b| (b, version))
    });
    let mut note = format!(
        "one boot each, wall time from spawn to the console line; ours: `vmm --kernel {} \
         --initrd {}` (256 MiB, 1 vCPU); kernel command line for both: {cmdline:?}",
        ours_kernel.display(),
        args.initrd.display()
    );
    let baseline = match qemu {
        Ok((boot, version)) => {
            note.push_str(&format!(
                "; QEMU ({version}): {}{} -kernel {} (BIOS + real-mode setup + decompressor \
                 before the kernel proper)",
                QEMU_ARGS.join(" "),
                cpu.as_ref().map_or(String::new(), |c| format!(" -cpu {c}")),
                qemu_kernel.display()
            ));
            Some(boot.to_init.as_secs_f64())
        }
        Err(e) => {
            note.push_str(&format!("; QEMU did not reach init: {e:#}"));
            None
        }
    };
    Ok(vec![Row::measured(
        5,
        ID,
        NAME,
        "s",
        ours.to_init.as_secs_f64(),
        "QEMU",
        baseline,
        Target::None,
        note,
    )])
}
