//! KVM tests with tiny hand-assembled guests booted through the Linux path (64-bit, ring 0):
//! serial output, the i8042 reset, a triple fault, and accesses to ports and MMIO addresses no
//! device claims.
mod common;

use std::time::Duration;

use common::{i8042_reset, kvm_available, run_vmm, serial_print, temp_file, text, tiny_elf};

const DEADLINE: Duration = Duration::from_secs(60);

fn boot(test: &str, code: &[u8], extra: &[&str]) -> std::process::Output {
    let path = temp_file(test, "guest.elf", &tiny_elf(code));
    let mut args = vec!["--kernel", path.to_str().expect("utf-8"), "--mem", "64M"];
    args.extend_from_slice(extra);
    run_vmm(&args, DEADLINE)
}

#[test]
fn serial_output_reaches_stdout_and_reset_ends_the_vm() {
    if !kvm_available("serial_output_reaches_stdout_and_reset_ends_the_vm") {
        return;
    }
    let mut code = serial_print(b"hello from a tiny guest\n");
    code.extend(i8042_reset());
    let out = boot("serial", &code, &["--timeout", "50"]);
    assert_eq!(text(&out.stdout), "hello from a tiny guest\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("guest reset"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn triple_fault_has_its_own_exit_code() {
    if !kvm_available("triple_fault_has_its_own_exit_code") {
        return;
    }
    // ud2 with an empty IDT: #UD → #GP → #DF → shutdown.
    let out = boot("triple", &[0x0f, 0x0b], &["--timeout", "50"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(stderr.contains("triple fault on vCPU 0"), "{stderr}");
}

#[test]
fn unknown_ports_and_mmio_are_counted_and_ignored() {
    if !kvm_available("unknown_ports_and_mmio_are_counted_and_ignored") {
        return;
    }
    let mut code = vec![
        0x66, 0xba, 0x34, 0x12, // mov dx, 0x1234
        0xb0, 0x55, 0xee, // mov al, 0x55; out dx, al
        0xec, // in al, dx
        0x3c, 0xff, // cmp al, 0xff   (unclaimed reads return all ones)
    ];
    let mmio = [
        0x48, 0xb8, 0x00, 0x00, 0x10, 0xd0, 0x00, 0x00, 0x00,
        0x00, // mov rax, 0xd0100000 (no device)
        0xc7, 0x00, 0xef, 0xbe, 0xad, 0xde, // mov dword [rax], 0xdeadbeef
        0x8b, 0x18, // mov ebx, [rax]
    ];
    let ok = serial_print(b"ok\n");
    let fail = serial_print(b"bad\n");
    let jmp_over_fail = [0xeb, u8::try_from(fail.len()).expect("short")];
    // jne over the MMIO accesses, the "ok" print and the jump: straight to "bad".
    let skip = mmio.len() + ok.len() + jmp_over_fail.len();
    code.extend([0x75, u8::try_from(skip).expect("short")]);
    code.extend(mmio);
    code.extend(&ok);
    code.extend(jmp_over_fail);
    code.extend(&fail);
    code.extend(i8042_reset());
    let stats = temp_file("unknown", "stats.json", b"");
    let out = boot(
        "unknown",
        &code,
        &["--timeout", "50", "--stats", stats.to_str().expect("utf-8")],
    );
    assert_eq!(text(&out.stdout), "ok\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats).expect("stats file")).expect("stats json");
    assert!(
        json["unhandled_exits"]["pio"].as_u64().unwrap_or(0) >= 2,
        "{json}"
    );
    assert!(
        json["unhandled_exits"]["mmio"].as_u64().unwrap_or(0) >= 2,
        "{json}"
    );
    assert_eq!(json["end"]["kind"], "guest_reset");
    let exits = &json["vcpus"][0]["exits"];
    assert!(exits["io_out"].as_u64().unwrap_or(0) >= 5, "{exits}");
    assert!(exits["mmio_write"].as_u64().unwrap_or(0) >= 1, "{exits}");
}

#[test]
fn timeout_ends_a_spinning_guest() {
    if !kvm_available("timeout_ends_a_spinning_guest") {
        return;
    }
    let out = boot("timeout", &[0xeb, 0xfe], &["--timeout", "1"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
}

/// Machine code: `mov dx, 0x3f8; mov al, 'x'; 1: out dx, al; jmp 1b` — a console flood.
fn serial_flood() -> Vec<u8> {
    vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xeb, 0xfd]
}

/// Starts `vmm` on a flooding guest with a stdout pipe that nobody reads; returns the child and
/// the unread pipe (kept open so writes block instead of failing).
fn flood_with_stalled_reader(
    test: &str,
    extra: &[&str],
) -> (std::process::Child, Option<std::process::ChildStdout>) {
    let path = temp_file(test, "guest.elf", &tiny_elf(&serial_flood()));
    let stats = path.with_file_name("stats.json");
    let mut child = std::process::Command::new(common::vmm_bin())
        .args(["--kernel", path.to_str().expect("utf-8"), "--mem", "64M"])
        .args(["--stats", stats.to_str().expect("utf-8")])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning vmm");
    let stdout = child.stdout.take();
    (child, stdout)
}

fn wait_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    common::wait_watching(child, limit, "a stalled console blocked it", || {}).0
}

#[test]
fn a_console_flood_into_a_stalled_pipe_cannot_outlive_the_timeout() {
    if !kvm_available("a_console_flood_into_a_stalled_pipe_cannot_outlive_the_timeout") {
        return;
    }
    let (mut child, pipe) = flood_with_stalled_reader("flood-timeout", &["--timeout", "2"]);
    let status = wait_within(&mut child, Duration::from_secs(20));
    drop(pipe);
    assert_eq!(status.code(), Some(7), "ended by the timeout");
    let stats = temp_file("flood-timeout", "unused", b"").with_file_name("stats.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats).expect("stats file")).expect("stats json");
    let dropped = json["console"]["dropped_bytes"].as_u64().unwrap_or(0);
    let written = json["console"]["written_bytes"].as_u64().unwrap_or(0);
    // Every `out` the flooding guest made is one byte of console output, and every byte either
    // reached the pipe or is counted as dropped (how many the guest gets to write in 2 s, and
    // so whether the pipe fills, depends on the host's exit rate).
    let produced = json["vcpus"][0]["exits"]["io_out"].as_u64().unwrap_or(0);
    assert_eq!(
        written + dropped,
        produced,
        "overflow is counted: {}",
        json["console"]
    );
}

#[test]
fn sigterm_ends_a_console_flood_into_a_stalled_pipe() {
    if !kvm_available("sigterm_ends_a_console_flood_into_a_stalled_pipe") {
        return;
    }
    let (mut child, pipe) = flood_with_stalled_reader("flood-sigterm", &[]);
    std::thread::sleep(Duration::from_secs(2));
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: signals our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = wait_within(&mut child, Duration::from_secs(15));
    drop(pipe);
    assert_eq!(status.code(), Some(130), "ended as interrupted");
}
