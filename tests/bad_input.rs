//! Bad input from a user gets a one-line error naming the problem and a non-zero exit code:
//! never a panic, never a hang.
mod common;

use std::time::Duration;

use common::{run_vmm, temp_file, text, tiny_elf};

const DEADLINE: Duration = Duration::from_secs(30);

/// Runs vmm and checks for a one-line error that contains every word of `expect`.
fn assert_rejected(args: &[&str], expect: &[&str]) {
    let out = run_vmm(args, DEADLINE);
    let stderr = text(&out.stderr);
    let code = out.status.code();
    assert!(
        code.is_some_and(|c| c != 0),
        "vmm {args:?} exited with {code:?}: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "vmm {args:?} panicked: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.contains("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "vmm {args:?}: expected one error line, got: {stderr}"
    );
    assert!(
        lines.iter().all(|l| l.starts_with("vmm")),
        "vmm {args:?}: stray output on stderr: {stderr}"
    );
    for word in expect {
        assert!(
            errors[0].to_lowercase().contains(&word.to_lowercase()),
            "vmm {args:?}: error {:?} does not mention {word:?}",
            errors[0]
        );
    }
}

fn kvm() -> bool {
    common::kvm_available("bad_input (KVM part)")
}

#[test]
fn missing_kernel_is_named() {
    if !kvm() {
        return;
    }
    assert_rejected(
        &["--kernel", "/nonexistent/vmlinuz"],
        &["/nonexistent/vmlinuz", "No such file"],
    );
}

#[test]
fn random_bytes_are_not_a_kernel() {
    if !kvm() {
        return;
    }
    let mut x = 0x2545_f491_u32;
    let junk: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x & 0xff) as u8
        })
        .collect();
    let path = temp_file("bad_input", "junk-kernel", &junk);
    assert_rejected(
        &["--kernel", path.to_str().expect("utf-8")],
        &["neither an ELF", "bzImage"],
    );
}

#[test]
fn truncated_kernels_are_refused() {
    if !kvm() {
        return;
    }
    // An ELF whose program header points past the end of the file.
    let mut elf = tiny_elf(&[0xf4; 64]);
    elf.truncate(0x90);
    let path = temp_file("bad_input", "truncated-elf", &elf);
    assert_rejected(
        &["--kernel", path.to_str().expect("utf-8")],
        &["cannot load kernel"],
    );
    // A bzImage header claiming more protected-mode code than the file holds.
    let mut bz = vec![0u8; 4096];
    bz[0x1f1] = 1; // setup_sects
    bz[0x1f4..0x1f8].copy_from_slice(&0x8000u32.to_le_bytes()); // syssize (16-byte units)
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
    bz[0x211] = 1; // loadflags: LOADED_HIGH
    bz[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    let path = temp_file("bad_input", "truncated-bzimage", &bz);
    assert_rejected(&["--kernel", path.to_str().expect("utf-8")], &["truncated"]);
}

#[test]
fn memory_sizes_are_checked() {
    assert_rejected(&["--mem", "0"], &["--mem", "greater than 0"]);
    assert_rejected(&["--mem", "12 parsecs"], &["--mem"]);
    assert_rejected(&["--mem", "64T"], &["exceeds the host"]);
    assert_rejected(
        &["--workload", "work 64 R 10", "--mem", "8M"],
        &["too small"],
    );
    assert_rejected(
        &[
            "--workload",
            "work 2048 R 10",
            "--workload",
            "work 2048 R 10",
            "--vcpus",
            "2",
        ],
        &["device hole"],
    );
}

#[test]
fn vcpu_counts_are_checked() {
    assert_rejected(&["--vcpus", "0"], &["--vcpus", "between 1 and"]);
    assert_rejected(&["--vcpus", "1000"], &["--vcpus", "between 1 and"]);
    assert_rejected(&["--kernel", "/k", "--vcpus", "0"], &["--vcpus"]);
    assert_rejected(&["--kernel", "/k", "--vcpus", "1000"], &["--vcpus"]);
}

#[test]
fn overlong_command_line_is_refused() {
    if !kvm() {
        return;
    }
    let path = temp_file("bad_input", "tiny", &tiny_elf(&[0xf4]));
    let long = "x".repeat(5000);
    assert_rejected(
        &[
            "--kernel",
            path.to_str().expect("utf-8"),
            "--cmdline",
            &long,
        ],
        &["command line", "5000"],
    );
}

#[test]
fn malformed_workload_specs_are_refused() {
    assert_rejected(&["--workload", "work 64 Q 10"], &["pattern must be R or L"]);
    assert_rejected(&["--workload", "work"], &["wrong number of fields"]);
    assert_rejected(&["--initrd", "/i"], &["--kernel"]);
}

/// Issue 8 §3: bounded work before any check.
#[test]
fn huge_counts_and_special_files_are_refused_before_any_work() {
    for n in ["4294967296", "1000000000", "0"] {
        assert_rejected(&["--vcpus", n], &["--vcpus", "between 1 and 64"]);
    }
    assert_rejected(&["--mem", "1K"], &["--mem", "less than 1 MiB"]);
    let fifo = temp_file("bad_input", "placeholder", b"").with_file_name("fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
    // SAFETY: creates a FIFO at a path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().expect("utf-8");
    // A FIFO as --stats is refused before the run (not after it; and never waited on).
    assert_rejected(
        &["--workload", "work 1 R 1 1", "--stats", fifo],
        &["--stats", "not a regular file"],
    );
    assert_rejected(
        &[
            "--workload",
            "work 1 R 1 1",
            "--stats",
            "/nonexistent/stats.json",
        ],
        &["--stats", "/nonexistent/stats.json"],
    );
    assert_rejected(
        &["plot", "-i", fifo, "-o", "/tmp/never"],
        &["not a regular file"],
    );
    assert_rejected(
        &["plot", "-i", "/dev/zero", "-o", "/tmp/never"],
        &["not a regular file"],
    );
    if !kvm() {
        return;
    }
    for kernel in [fifo, "/dev/zero", "/tmp"] {
        assert_rejected(&["--kernel", kernel], &[kernel, "not a regular file"]);
    }
    let tiny = temp_file("bad_input", "tiny-ok", &tiny_elf(&[0xf4]));
    let tiny = tiny.to_str().expect("utf-8");
    assert_rejected(
        &["--kernel", tiny, "--initrd", fifo],
        &["initrd", "not a regular file"],
    );
    let mut arm = tiny_elf(&[0xf4]);
    arm[0x12..0x14].copy_from_slice(&183u16.to_le_bytes());
    let arm = temp_file("bad_input", "arm.elf", &arm);
    assert_rejected(&["--kernel", arm.to_str().expect("utf-8")], &["not x86-64"]);
}

/// Issue 8 §7: the small faults.
#[test]
fn small_faults_have_one_clear_line() {
    assert_rejected(
        &["--workload", "work 1 R 1 1", "--cmdline", "quiet"],
        &["--cmdline", "need --kernel"],
    );
    assert_rejected(
        &["--workload", "work 1 R 1 1", "--initrd", "/i"],
        &["--initrd", "need --kernel"],
    );
    let file = temp_file("bad_input", "a-file", b"");
    let file = file.to_str().expect("utf-8");
    if kvm() {
        assert_rejected(
            &["--workload", "work 1 R 1 1", "--run-dir", file],
            &["run directory", "not a directory"],
        );
        // An OS error is printed once, not once per layer that quotes it.
        let out = run_vmm(&["--kernel", "/nonexistent/vmlinuz"], DEADLINE);
        let stderr = text(&out.stderr);
        assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    }
}

fn spawn_with_pty(args: &[&str]) -> (std::process::Child, std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors we then own.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: fresh descriptors from openpty.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let ws = libc::winsize {
        ws_row: 24,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: sets the window size of our pty.
    unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&slave),
            libc::TIOCSWINSZ,
            &ws,
        )
    };
    let stdio = || std::process::Stdio::from(slave.try_clone().expect("dup"));
    let child = std::process::Command::new(common::vmm_bin())
        .args(args)
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio())
        .spawn()
        .expect("spawn");
    // Drain the master so the child's writes never block.
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut buf = [0u8; 4096];
        while std::io::Read::read(&mut f, &mut buf).is_ok_and(|n| n > 0) {}
    });
    (child, slave)
}

fn icanon(fd: &std::os::fd::OwnedFd) -> bool {
    // SAFETY: reads the settings of our pty into a struct we own.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::tcgetattr(std::os::fd::AsRawFd::as_raw_fd(fd), &mut t) };
    t.c_lflag & libc::ICANON != 0
}

/// Issue 8 §7: `vmm top` ended by SIGTERM or SIGHUP restores the terminal.
#[test]
fn top_restores_the_terminal_when_terminated() {
    let dir = temp_file("bad_input", "placeholder", b"").with_file_name("top-run");
    let _ = std::fs::create_dir_all(&dir);
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        let (mut child, slave) =
            spawn_with_pty(&["top", "--run-dir", dir.to_str().expect("utf-8")]);
        let start = std::time::Instant::now();
        while icanon(&slave) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "top never went raw"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid, signal) };
        let start = std::time::Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("top ignored signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(icanon(&slave), "signal {signal} left the terminal raw");
    }
}

/// Issue 8 §7: `vmm record` interrupted exits 130, as the README says.
#[test]
fn record_interrupted_exits_130() {
    let dir = temp_file("bad_input", "placeholder", b"").with_file_name("record-run");
    let _ = std::fs::create_dir_all(&dir);
    let out = dir.with_file_name("record.csv");
    let mut child = std::process::Command::new(common::vmm_bin())
        .args([
            "record",
            "--wait",
            "30",
            "--run-dir",
            dir.to_str().expect("utf-8"),
        ])
        .args(["-o", out.to_str().expect("utf-8")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "record ignored SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
}
