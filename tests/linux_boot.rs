//! Linux end to end with the reference guest (`resources/build-guest.sh`): the kernel boots to
//! `/init` on both vCPUs, the e820 map and command line it prints are the ones the VMM gave, and
//! the built-in profiler driver (guest/linux) probes the profiler device during boot: it formats
//! the shared region, and the host reader finds a valid guest header with the guest's boot id.
//!
//! On a PVM host guest user space cannot run, so the run ends at the kernel's panic after init
//! faults (`panic=1` → reboot → i8042 reset); on a VT-x/AMD-V host init prints its marker and
//! reboots. Either way the VM must end by itself with exit code 0.
mod common;

use std::time::Duration;

use common::{on_pvm, reference_linux, run_vmm_text};
use vmm::arch::x86_64::boot_params::{e820_map, E820_RAM};
use vmm::vstate::memory::ram_ranges;

const MEM: u64 = 256 << 20;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 mirrorball.test=e820-and-cmdline";

#[test]
fn reference_kernel_boots_to_init_with_our_e820_and_cmdline() {
    let Some((kernel, initrd)) =
        reference_linux("reference_kernel_boots_to_init_with_our_e820_and_cmdline")
    else {
        return;
    };
    let stats = common::temp_file("linux_boot", "stats.json", b"");
    let run = run_vmm_text(
        &[
            "--stats",
            stats.to_str().expect("utf-8"),
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--initrd",
            initrd.to_str().expect("utf-8"),
            "--cmdline",
            CMDLINE,
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--timeout",
            "900",
        ],
        Duration::from_secs(960),
    );
    run.assert_console_has("Run /init as init process", "no init");
    if !on_pvm() {
        run.assert_console_has("MIRRORBALL-INIT-OK", "no init marker");
    }
    run.assert_console_has(&format!("Command line: {CMDLINE}"), "cmdline");
    for entry in e820_map(&ram_ranges(MEM)) {
        let (addr, size, kind) = (entry.addr, entry.size, entry.r#type);
        let kind = if kind == E820_RAM {
            "usable"
        } else {
            "reserved"
        };
        let line = format!(
            "BIOS-e820: [mem {addr:#018x}-{:#018x}] {kind}",
            addr + size - 1
        );
        run.assert_console_has(&line, "e820 map");
    }
    run.assert_console_has("Brought up 1 node, 2 CPUs", "SMP");
    run.assert_success();
    assert_profiler_probed(&run, &stats);
}

/// The built-in driver found the device, formatted the region and set DRIVER_OK, and the host
/// reader (the validation `vmm top` uses) sees the guest's header.
fn assert_profiler_probed(run: &common::Finished, stats: &std::path::Path) {
    run.assert_console_has(
        "mirrorball: profiler ready: region",
        "the profiler driver did not probe",
    );
    let stats = std::fs::read_to_string(stats).expect("stats file");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    let device = &stats["profiler_device"];
    assert_eq!(
        device["driver_ok"],
        true,
        "device: {device}\n{}",
        run.context()
    );
    // The driver's sched_switch probe announced task switches (exact attribution).
    assert!(
        device["switch_doorbells"].as_u64().is_some_and(|n| n > 0),
        "device: {device}"
    );
    let region = &stats["guest_region"];
    assert_eq!(region["valid"], true, "guest region: {region}");
    assert_ne!(region["guest_boot_id"], 0, "guest region: {region}");
    assert_eq!(region["vcpus"], 2, "guest region: {region}");
    assert!(
        region["sample_period_ns"].as_u64().is_some_and(|p| p > 0),
        "guest region: {region}"
    );
}
