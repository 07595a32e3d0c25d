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
            x as u8
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
