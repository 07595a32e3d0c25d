//! Helpers shared by the end-to-end tests: running the `vmm` binary with a deadline, tiny
//! hand-assembled guests, and finding the reference Linux guest.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the `vmm` binary under test.
pub fn vmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmm"))
}

/// True when /dev/kvm can be opened; otherwise prints why the calling test skips.
#[allow(unused_imports)] // not every suite that includes this module needs it
pub use mirrorball_profiler::testing::kvm_available;

/// Runs `vmm` with `args`, killing it after `deadline`. Panics if it had to be killed.
pub fn run_vmm(args: &[&str], deadline: Duration) -> Output {
    let mut child = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmm");
    let mut stdout = child.stdout.take().expect("stdout");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let (status, stderr) = wait_watching(&mut child, deadline, &format!("{args:?}"), || {});
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: stderr.into_bytes(),
    }
}

/// Starts `vmm args` in the background: no stdin, stdout discarded, stderr piped (for
/// [`wait_watching`]).
pub fn spawn_vmm(args: &[&str]) -> Child {
    Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vmm")
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: signals a child this test started; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// Waits for `child` to end, calling `watch` about every 10 ms meanwhile (to sample what the
/// running `vmm` holds); kills it and panics, naming `what`, when it runs past `deadline`.
/// Returns its exit status and its stderr (empty unless piped).
pub fn wait_watching(
    child: &mut Child,
    deadline: Duration,
    what: &str,
    mut watch: impl FnMut(),
) -> (ExitStatus, String) {
    let stderr = child.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text(&bytes)
        })
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for vmm") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: vmm did not end within {deadline:?}");
        }
        watch();
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = stderr
        .map(|reader| reader.join().unwrap_or_default())
        .unwrap_or_default();
    (status, stderr)
}

/// Runs `vmm args` and asserts that it fails with exit code `code` and one line of stderr that
/// holds each of `words`.
pub fn assert_one_line_error(args: &[&str], code: i32, words: &[&str]) {
    let out = run_vmm(args, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line expected: {stderr}");
    for w in words {
        assert!(lines[0].contains(w), "{args:?}: {w:?} missing: {stderr}");
    }
}

/// A JSON file (`--stats`) as a value.
pub fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (iterations, finished, checksum, guest_min_flt) of every task of one VM's `--stats`.
pub fn task_results(vm: &serde_json::Value) -> Vec<(u64, bool, u64, u64)> {
    vm["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            (
                t["iterations"].as_u64().unwrap_or(0),
                t["finished"].as_bool().unwrap_or(false),
                t["checksum"].as_u64().unwrap_or(0),
                t["guest_min_flt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The control socket a VM publishes in `run_dir`, once it appeared (at most 30 s).
pub fn control_socket(run_dir: &Path) -> PathBuf {
    let start = Instant::now();
    loop {
        let found = std::fs::read_dir(run_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "ctl"));
        if let Some(p) = found {
            return p;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For a test that needs KVM, root and `what` (`present`): whether it can run; otherwise it
/// says why and skips, or fails under CI.
pub fn root_and(test: &str, what: &str, present: bool) -> bool {
    if !kvm_available(test) {
        return false;
    }
    if is_root() && present {
        return true;
    }
    skip_or_fail(test, &format!("needs root and {what}"));
    false
}

/// Runs a VM built in this process to its end (no console input, never interrupted), ending
/// it after `timeout`; `keep_regions` gets its profiler regions once its sampler stopped.
pub fn run_in_process(
    built: vmm::builder::BuiltVm,
    timeout: Duration,
    keep_regions: Option<&dyn Fn(std::sync::Arc<vmm::profiling::regions::ProfilerRegions>)>,
) -> vmm::report::RunReport {
    let interrupted = std::sync::atomic::AtomicBool::new(false);
    let options = vmm::session::SessionOptions {
        timeout: Some(timeout),
        interrupted: &interrupted,
        console_input: false,
        keep_regions,
    };
    vmm::session::run(built, options).expect("run")
}

/// Guest-physical load address (and entry) of [`tiny_elf`] guests: where vmlinux loads.
pub const TINY_GUEST_ADDR: u64 = 0x100_0000;

/// An ELF64 executable with one loadable segment holding `code` at [`TINY_GUEST_ADDR`]; the VMM
/// boots it like a vmlinux (64-bit, ring 0, paging on).
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut elf = Vec::new();
    let code_offset = 0x78u64; // 64-byte header + one 56-byte program header
                               // ELF header
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, System V
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&TINY_GUEST_ADDR.to_le_bytes()); // entry
    elf.extend_from_slice(&0x40u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
                                                // Program header: PT_LOAD, R+X
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&code_offset.to_le_bytes());
    elf.extend_from_slice(&TINY_GUEST_ADDR.to_le_bytes()); // vaddr
    elf.extend_from_slice(&TINY_GUEST_ADDR.to_le_bytes()); // paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(elf.len() as u64, code_offset);
    elf.extend_from_slice(code);
    elf
}

/// Machine code: `mov dx, port; mov al, byte; out dx, al` for each byte of `text`.
pub fn serial_print(text: &[u8]) -> Vec<u8> {
    let mut code = Vec::new();
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for &b in text {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code
}

/// Machine code: reset through the i8042 (`mov al, 0xfe; out 0x64, al`), then spin.
pub fn i8042_reset() -> Vec<u8> {
    vec![0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]
}

/// Writes `data` to a fresh file in a per-test temporary directory.
pub fn temp_file(test: &str, name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mirrorball-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, data).expect("temp file");
    path
}

/// Output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The reference guest (kernel, initramfs): from MIRRORBALL_KERNEL / MIRRORBALL_INITRD, else
/// built (or found in the cache) by `resources/build-guest.sh`. `Err` says why there is none.
pub fn reference_guest() -> Result<(PathBuf, PathBuf), String> {
    if let (Ok(k), Ok(i)) = (
        std::env::var("MIRRORBALL_KERNEL"),
        std::env::var("MIRRORBALL_INITRD"),
    ) {
        return Ok((k.into(), i.into()));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/build-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        let err = text(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!("{} failed: {}", script.display(), tail.join(" | ")));
    }
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines().rev();
    let initrd = PathBuf::from(lines.next().unwrap_or_default());
    let kernel = PathBuf::from(lines.next().unwrap_or_default());
    if kernel.exists() && initrd.exists() {
        Ok((kernel, initrd))
    } else {
        Err(format!(
            "{} printed no kernel/initrd paths",
            script.display()
        ))
    }
}

/// Whether `/dev/kvm` is served by PVM (guest kernel mode emulated, guest user space cannot run).
pub fn on_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The reference Linux guest a test boots: the kernel (its ELF `vmlinux` on a PVM host when it
/// was built, which skips the emulated and slow decompressor; else the bzImage) and initramfs.
/// `None` after [`kvm_available`] or [`skip_or_fail`] said why `test` cannot run: no KVM or no
/// reference guest.
pub fn reference_linux(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !kvm_available(test) {
        return None;
    }
    let (kernel, initrd) = match reference_guest() {
        Ok(guest) => guest,
        Err(why) => {
            skip_or_fail(test, &format!("no reference guest ({why})"));
            return None;
        }
    };
    let vmlinux = kernel.with_file_name("vmlinux");
    let kernel = if on_pvm() && vmlinux.exists() {
        vmlinux
    } else {
        kernel
    };
    Some((kernel, initrd))
}

/// A finished `vmm` run, as text: the console (stdout), stderr and the exit code.
pub struct Finished {
    pub console: String,
    pub stderr: String,
    pub code: Option<i32>,
}

impl Finished {
    /// Both outputs, for an assertion's message.
    pub fn context(&self) -> String {
        format!(
            "--- console ---\n{}\n--- stderr ---\n{}",
            self.console, self.stderr
        )
    }

    /// Asserts that the console shows `line` (`what` names it in the failure).
    pub fn assert_console_has(&self, line: &str, what: &str) {
        assert!(
            self.console.contains(line),
            "{what}: no {line:?} on the console:\n{}",
            self.context()
        );
    }

    /// Asserts that the VM ended by itself with exit code 0.
    pub fn assert_success(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "the VM must end by itself with 0:\n{}",
            self.context()
        );
    }
}

/// [`run_vmm`] with the output as text.
pub fn run_vmm_text(args: &[&str], deadline: Duration) -> Finished {
    let out = run_vmm(args, deadline);
    Finished {
        console: text(&out.stdout),
        stderr: text(&out.stderr),
        code: out.status.code(),
    }
}

/// Runs the workload `spec` on one vCPU, snapshotted `after` seconds in into `snap`, with its
/// stats in `stats`; returns the command's output.
pub fn run_workload_snapshotted(
    spec: &str,
    after: &str,
    snap: &Path,
    stats: &Path,
    deadline: Duration,
) -> Output {
    let utf8 = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let (snap, stats) = (utf8(snap), utf8(stats));
    run_vmm(
        &[
            "--workload",
            spec,
            "--vcpus",
            "1",
            "--snapshot-after",
            after,
            &snap,
            "--stats",
            &stats,
        ],
        deadline,
    )
}

/// For a test that cannot run for `why`: prints that it skips, or, under CI (where everything a
/// test needs is installed), fails.
pub fn skip_or_fail(test: &str, why: &str) {
    if in_ci() {
        panic!("{test} cannot run in CI: {why}");
    }
    eprintln!("skipped {test}: {why}");
}

/// True under CI, where a missing prerequisite must fail a test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// Distinct pages an OS-less task with parameters `t` touches over its whole run: the guest's
/// streams are deterministic (the VMM picks the seeds), so the host can replay them.
pub fn distinct_pages(t: &mirrorball_workload::TaskParams) -> u64 {
    use mirrorball_workload::{AccessStream, Pattern, PAGE_BYTES};
    let pattern = Pattern::from_raw(t.pattern).expect("pattern");
    let mut stream = AccessStream::new(pattern, t.region_bytes, t.seed);
    let mut pages = std::collections::BTreeSet::new();
    for _ in 0..t.accesses_per_iteration * u64::from(t.iterations) {
        pages.insert(stream.next_offset() % t.region_bytes / PAGE_BYTES);
    }
    u64::try_from(pages.len()).expect("fits")
}

/// Byte offset of the ext2 superblock's mount count (the superblock starts at byte 1024).
pub const EXT2_S_MNT_COUNT: usize = 1024 + 0x34;
/// Byte offset of the ext2 superblock's mounts-before-a-check count.
pub const EXT2_S_MAX_MNT_COUNT: usize = 1024 + 0x36;

/// The little-endian u16 at `at` in `bytes`.
pub fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// An ext2 image `dir/name` of 2048 blocks of `block` bytes (holding the tree `root`, if
/// given), made by `mke2fs`, or why none could be made.
pub fn ext2_image(
    dir: &Path,
    name: &str,
    block: u32,
    root: Option<&Path>,
) -> Result<PathBuf, String> {
    let image = dir.join(name);
    let mut mke2fs = Command::new("mke2fs");
    mke2fs.args(["-q", "-F", "-t", "ext2", "-b", &block.to_string()]);
    if let Some(root) = root {
        mke2fs.arg("-d").arg(root);
    }
    let out = mke2fs
        .arg(&image)
        .arg("2048")
        .output()
        .map_err(|e| format!("cannot run mke2fs (install e2fsprogs): {e}"))?;
    if !out.status.success() {
        return Err(format!("mke2fs failed: {}", text(&out.stderr)));
    }
    Ok(image)
}
