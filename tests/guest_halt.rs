//! A guest that halts for good (`cli; hlt`, what Linux does to halt or power off without ACPI)
//! ends the VM with exit code 0, on one vCPU and on two (the second never started); a guest
//! that halts with interrupts on keeps running until its timeout.
mod common;

use std::time::Duration;

use common::{kvm_available, run_vmm, temp_file, text, tiny_elf};

const DEADLINE: Duration = Duration::from_secs(60);

/// cli; hlt; jmp back to hlt.
const CLI_HLT: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
/// sti; hlt; jmp back to hlt.
const STI_HLT: [u8; 4] = [0xfb, 0xf4, 0xeb, 0xfd];

fn boot(test: &str, code: &[u8], vcpus: &str, timeout: &str) -> std::process::Output {
    let path = temp_file(test, "guest.elf", &tiny_elf(code));
    let args = [
        "--kernel",
        path.to_str().expect("utf-8"),
        "--mem",
        "64M",
        "--vcpus",
        vcpus,
        "--timeout",
        timeout,
    ];
    run_vmm(&args, DEADLINE)
}

#[test]
fn halted_with_interrupts_off_ends_the_vm_with_code_0() {
    let test = "halted_with_interrupts_off_ends_the_vm_with_code_0";
    if !kvm_available(test) {
        return;
    }
    for vcpus in ["1", "2"] {
        let out = boot(test, &CLI_HLT, vcpus, "30");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{vcpus} vCPU(s): {stderr}");
        assert!(stderr.contains("guest halted"), "{stderr}");
    }
}

#[test]
fn halted_with_interrupts_on_is_not_the_end() {
    let test = "halted_with_interrupts_on_is_not_the_end";
    if !kvm_available(test) {
        return;
    }
    let out = boot(test, &STI_HLT, "1", "3");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("timeout"), "{stderr}");
}
