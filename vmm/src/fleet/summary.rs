//! The end of a fleet: one row per VM (how it ended, its exit code, its memory against the
//! template) and the command's exit code.
//!
//! The command's exit code: 0 when every VM ended with 0; 130 when interrupted; otherwise the
//! VMs' own code when all failing VMs agree on it, and [`EXIT_FLEET_MIXED`] when they differ (the
//! table says which VM ended how). A VM that could not be built or started counts as code 1.
use std::fmt::Write as _;

use crate::exit::{VmEnd, EXIT_VMM_ERROR};
use crate::report::RunReport;
use crate::runner::RunError;
use crate::workload::seconds;

/// Exit code when the VMs of a fleet failed in different ways.
pub const EXIT_FLEET_MIXED: i32 = 8;

/// What happened to one VM.
pub type VmResult = Result<RunReport, (String, RunError)>;

fn code(r: &VmResult) -> i32 {
    match r {
        Ok(report) => report.end_reason.exit_code(),
        Err((_, RunError::Snapshot(_))) => crate::snapshot::EXIT_SNAPSHOT,
        Err(_) => EXIT_VMM_ERROR,
    }
}

/// The command's exit code for these VMs.
pub fn exit_code(results: &[VmResult]) -> i32 {
    let failed: Vec<i32> = results.iter().map(code).filter(|&c| c != 0).collect();
    if failed.contains(&130) {
        return 130;
    }
    match failed.first() {
        None => 0,
        Some(&first) if failed.iter().all(|&c| c == first) => first,
        Some(_) => EXIT_FLEET_MIXED,
    }
}

/// For a VM that timed out (a guest that hung, most likely): one line per vCPU saying where it
/// stopped, each starting with `prefix`; empty for other ends.
pub fn where_vcpus_stopped(report: &RunReport, prefix: &str) -> String {
    if !matches!(report.end_reason, VmEnd::Timeout { .. }) {
        return String::new();
    }
    let mut out = String::new();
    for vcpu in &report.vcpus {
        if let Some(at) = &vcpu.stopped_at {
            let _ = writeln!(out, "{prefix}vCPU {} stopped at {at}", vcpu.index);
        }
    }
    out
}

/// The closing per-VM table.
pub fn table(results: &[VmResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<9} {:>4} {:>9} {:>10} {:>10} {:>10}  end",
        "vm", "guest", "code", "elapsed_s", "shared_pg", "private_pg", "cow_breaks"
    );
    for r in results {
        match r {
            Ok(report) => {
                let mem = report.memory.as_ref();
                let pages = |f: fn(&crate::profiling::sharing::SharingReport) -> u64| {
                    mem.map_or("-".to_string(), |m| f(m).to_string())
                };
                let _ = writeln!(
                    out,
                    "{:<12} {:<9} {:>4} {:>9.3} {:>10} {:>10} {:>10}  {}",
                    report.name,
                    report.guest,
                    report.end_reason.exit_code(),
                    seconds(report.elapsed_ns),
                    pages(|m| m.total.shared),
                    pages(|m| m.total.private),
                    pages(|m| m.cow_breaks),
                    report.end_reason
                );
                out.push_str(&where_vcpus_stopped(
                    report,
                    &format!("  {}: ", report.name),
                ));
            }
            Err((name, e)) => {
                let _ = writeln!(
                    out,
                    "{:<12} {:<9} {:>4} {:>9} {:>10} {:>10} {:>10}  refused: {e}",
                    name, "-", EXIT_VMM_ERROR, "-", "-", "-", "-"
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorball_profiler::vcpu_accounting::{StoppedAt, VcpuReport};

    fn ended(end: VmEnd) -> VmResult {
        Ok(RunReport {
            name: "vm".into(),
            end: (&end).into(),
            guest: "workload",
            host: "pvm".into(),
            mem_bytes: 0,
            elapsed_ns: 0,
            vcpus: Vec::new(),
            vm_kvm_stats: Default::default(),
            unhandled_exits: Default::default(),
            memory: None,
            tasks: Vec::new(),
            no_task: None,
            profiler: None,
            profiler_device: None,
            guest_region: None,
            sampler: None,
            console: None,
            disk: None,
            end_reason: end,
        })
    }

    #[test]
    fn exit_code_says_how_the_fleet_ended() {
        let ok = || ended(VmEnd::WorkloadFinished);
        assert_eq!(exit_code(&[ok(), ok()]), 0);
        let triple = || ended(VmEnd::TripleFault { vcpu: 0, rip: 0 });
        assert_eq!(exit_code(&[ok(), triple(), triple()]), 3);
        let refused: VmResult = Err(("b".into(), RunError::Build("no".into())));
        assert_eq!(exit_code(&[ok(), triple(), refused]), EXIT_FLEET_MIXED);
        assert_eq!(exit_code(&[triple(), ended(VmEnd::Interrupted)]), 130);
        let bad_snapshot = || Err(("c".into(), RunError::Snapshot("corrupted".into())));
        assert_eq!(exit_code(&[bad_snapshot(), bad_snapshot()]), 22);
        let t = table(&[
            ok(),
            Err(("b".into(), RunError::Build("bad kernel".into()))),
        ]);
        assert_eq!(t.lines().count(), 3, "{t}");
        assert!(t.contains("refused: bad kernel"), "{t}");
    }

    #[test]
    fn a_timed_out_vm_says_where_each_vcpu_stopped() {
        let with_vcpu = |end: VmEnd| {
            let mut r = ended(end).expect("a report");
            r.vcpus.push(VcpuReport {
                index: 0,
                stopped_at: Some(StoppedAt {
                    rip: 0xffff_ffff_8100_1234,
                    rflags: 0x202,
                    mp_state: 3,
                }),
                ..Default::default()
            });
            r
        };
        let hung = with_vcpu(VmEnd::Timeout { seconds: 90.0 });
        assert_eq!(
            where_vcpus_stopped(&hung, "vm1: "),
            "vm1: vCPU 0 stopped at rip 0xffffffff81001234, halted, interrupts on\n"
        );
        assert!(table(&[Ok(hung)]).contains("  vm: vCPU 0 stopped at rip 0xffffffff81001234"));
        let fine = with_vcpu(VmEnd::WorkloadFinished);
        assert_eq!(where_vcpus_stopped(&fine, ""), "");
    }
}
