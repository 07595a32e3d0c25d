//! The Linux profiler driver (guest/linux) from guest user space, on the reference kernel.
//!
//! Our PVM machines cannot run Linux user space, so this test boots the reference kernel (built
//! by `resources/build-guest.sh` with the driver built in) under QEMU TCG, where user space runs,
//! with a fake profiler device module standing in for the VMM's device.
//! `guest/linux/test/run-qemu-test.sh` does the work: `mbtest` checks `/proc/mirrorball`, the
//! `/dev/mirrorball` mmap, registration, a 1 kHz sampler losing and tearing no record, counters
//! matching `/proc/<pid>/stat`, unbind/bind and device removal, and the console must show no
//! kernel warning.
//!
//! Needs `qemu-system-x86_64` (`.ci/run` installs it) and the kernel's build tree next to the
//! bzImage; without them it skips with a reason, except in CI where it fails.
mod common;

use std::path::Path;
use std::process::Command;

use common::{reference_guest, skip_or_fail, text};

const TEST: &str = "linux_driver_passes_its_user_space_checks_under_qemu";

fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn linux_driver_passes_its_user_space_checks_under_qemu() {
    let (kernel, _initrd) = match reference_guest() {
        Ok(guest) => guest,
        Err(why) => return skip_or_fail(TEST, &format!("no reference guest ({why})")),
    };
    let build = kernel.with_file_name("build");
    if !build.join(".config").is_file() || !build.join("source").exists() {
        return skip_or_fail(
            TEST,
            &format!("no kernel build tree at {}", build.display()),
        );
    }
    if !qemu_available() {
        return skip_or_fail(
            TEST,
            "qemu-system-x86_64 not found (apt-get install qemu-system-x86)",
        );
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/linux/test/run-qemu-test.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(build.join("source"))
        .arg(&build)
        .output()
        .expect("running run-qemu-test.sh");
    let console = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "run-qemu-test.sh failed ({}):\n--- console ---\n{console}\n--- stderr ---\n{stderr}",
        out.status
    );
    // The script's verdict rests on these markers; check the ones that prove the checks ran.
    for marker in ["MBTEST-RC=0", "MBTEST-REATTACH-RC=0", "MBTEST-DONE"] {
        assert!(console.contains(marker), "no {marker}:\n{console}");
    }
}
