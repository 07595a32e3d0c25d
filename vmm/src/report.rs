//! What a run produced, for people (the per-task summary) and for tools (`--stats` JSON).
use std::collections::BTreeMap;
use std::fmt::Write as _;

use mirrorball_profiler::vcpu_accounting::VcpuReport;
use serde::Serialize;

use crate::exit::VmEnd;
use crate::profiling::attribution::{GuestTotals, TaskTotals};
use crate::profiling::sharing::{RangeReport, SharingReport};
use crate::workload::{seconds, task_vcpu, TaskProgress, TaskSpec};

/// How the VM ended, in the stats file.
#[derive(Clone, Debug, Serialize)]
pub struct EndReport {
    /// Stable name of the reason.
    pub kind: &'static str,
    /// The one-line message.
    pub message: String,
    /// The process exit code.
    pub exit_code: i32,
}

impl From<&VmEnd> for EndReport {
    fn from(end: &VmEnd) -> Self {
        Self {
            kind: end.kind(),
            message: end.to_string(),
            exit_code: end.exit_code(),
        }
    }
}

/// The profiler device's state at the end of a run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DeviceReport {
    /// virtio device status the driver reached (1 = ACKNOWLEDGE: the guest found the device).
    pub status: u8,
    /// Whether a driver set DRIVER_OK.
    pub driver_ok: bool,
    /// Period the guest's driver asked for, ns.
    pub requested_period_ns: Option<u64>,
    /// Task switches the driver announced through the switch doorbell.
    pub switch_doorbells: u64,
}

impl DeviceReport {
    /// The device's state now, from its control block.
    pub fn new(c: &mirrorball_devices::ProfilerControl) -> Self {
        Self {
            status: c.status(),
            driver_ok: c.driver_ok(),
            requested_period_ns: c.requested_period_ns(),
            switch_doorbells: c.switch_doorbells(),
        }
    }
}

/// The copy-on-write disk's counters at the end of a run (`--disk`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DiskReport {
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed (into the VM's overlay).
    pub writes: u64,
    /// Bytes read by the guest.
    pub read_bytes: u64,
    /// Bytes written by the guest.
    pub written_bytes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// 4 KiB blocks the overlay holds.
    pub overlay_blocks: u64,
    /// Requests answered with an I/O error (bad sector, size or direction).
    pub io_errors: u64,
    /// Requests of an unknown type.
    pub unsupported: u64,
    /// Descriptor chains refused as malformed (no status written).
    pub malformed: u64,
    /// Guest pages a read mapped from the base instead of copying (`map=on`).
    pub mapped_pages: u64,
    /// `mmap` calls that mapped them.
    pub mappings: u64,
    /// Pages that could have been mapped but were copied (mapping budget spent).
    pub map_fallback_pages: u64,
}

impl DiskReport {
    /// The counters now.
    pub fn new(m: &mirrorball_devices::virtio_blk::DiskMetrics) -> Self {
        Self {
            reads: m.reads(),
            writes: m.writes(),
            read_bytes: m.read_bytes(),
            written_bytes: m.written_bytes(),
            flushes: m.flushes(),
            overlay_blocks: m.overlay_blocks(),
            io_errors: m.io_errors(),
            unsupported: m.unsupported(),
            malformed: m.malformed(),
            mapped_pages: m.mapped_pages(),
            mappings: m.mappings(),
            map_fallback_pages: m.map_fallback_pages(),
        }
    }
}

/// The guest part of the profiler region as the host reader found it at the end of a run: the
/// same validation `vmm top` and `vmm record` apply (every byte is guest-written).
#[derive(Clone, Debug, Serialize)]
pub struct GuestRegionReport {
    /// Whether the header validated (a guest driver formatted the region).
    pub valid: bool,
    /// Why not, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The guest's boot id (0: no driver ever published one).
    pub guest_boot_id: u64,
    /// The guest sampler's period as published, ns.
    pub sample_period_ns: u64,
    /// vCPU slots in the region.
    pub vcpus: u32,
    /// Samples the guest wrote to its ring (the ring's head).
    pub samples_written: u64,
}

impl GuestRegionReport {
    /// From the host readers' validation of the region (`validate_guest_region`).
    pub fn new(
        validated: &Result<
            mirrorball_profiler_abi::GuestRegionView<'_>,
            mirrorball_profiler_abi::AbiError,
        >,
    ) -> Self {
        match validated {
            Ok(view) => Self {
                valid: true,
                error: None,
                guest_boot_id: view.guest_boot_id(),
                sample_period_ns: view.sample_period_ns(),
                vcpus: view.vcpu_count(),
                samples_written: view.ring().head(),
            },
            Err(e) => Self {
                valid: false,
                error: Some(e.to_string()),
                guest_boot_id: 0,
                sample_period_ns: 0,
                vcpus: 0,
                samples_written: 0,
            },
        }
    }
}

/// One workload task in the stats file.
#[derive(Clone, Debug, Serialize)]
pub struct TaskReport {
    /// Task index.
    pub task: usize,
    /// vCPU it ran on.
    pub vcpu: usize,
    /// What the profiler's host sampler attributed to the task, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<TaskTotals>,
    /// The guest's own count of the task's minor faults (first touches of its pages), from its
    /// last guest sample, if the profiler ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_min_flt: Option<u64>,
    /// The task region's pages (shared with the template, private) and copy-on-write breaks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<RangeReport>,
    /// The guest's own measure of the task's CPU time (its TSC while the task was switched
    /// in), ns, if the profiler ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cpu_ns: Option<u64>,
    /// The `work` spec.
    pub spec: String,
    /// Iterations asked for.
    pub iterations_planned: u32,
    /// What the VMM saw through the doorbell.
    #[serde(flatten)]
    pub progress: TaskProgress,
}

/// The serial console's output: bytes written to stdout and bytes dropped because stdout did
/// not take them (a full buffer, or a failed or stalled write).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ConsoleReport {
    /// Bytes that reached the console sink (the terminal or the log file).
    pub written_bytes: u64,
    /// Bytes dropped.
    pub dropped_bytes: u64,
}

/// Everything `--stats` writes about one VM.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The VM's name.
    pub name: String,
    /// Why the VM ended.
    pub end: EndReport,
    /// "linux" or "workload".
    pub guest: &'static str,
    /// Host KVM kind.
    pub host: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// From starting the vCPUs to their end, nanoseconds.
    pub elapsed_ns: u64,
    /// Per-vCPU accounting.
    pub vcpus: Vec<VcpuReport>,
    /// VM-wide KVM binary stats over the run (deltas of cumulative ones).
    pub vm_kvm_stats: BTreeMap<String, u64>,
    /// Port-I/O and MMIO accesses no device handled (counted and ignored).
    pub unhandled_exits: BTreeMap<&'static str, u64>,
    /// The VM's RAM: pages shared with its template, private pages, copy-on-write breaks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<SharingReport>,
    /// Workload tasks (OS-less guest only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskReport>,
    /// What the host sampler charged to no task (boot before the guest named one, idle,
    /// unreadable slots), if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_task: Option<TaskTotals>,
    /// Name of the profiler regions in the run directory (`vm-<pid>-<n>`), if published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiler: Option<String>,
    /// The profiler device as the guest left it (Linux guests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiler_device: Option<DeviceReport>,
    /// The guest part of the profiler region at the end, as host readers see it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_region: Option<GuestRegionReport>,
    /// What the host sampler did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampler: Option<crate::profiling::sampler::SamplerReport>,
    /// What happened to the guest's console output (Linux guests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleReport>,
    /// The copy-on-write disk's counters (`--disk`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskReport>,
    /// The end itself, for the caller's exit code and message.
    #[serde(skip)]
    pub end_reason: VmEnd,
}

/// Pairs workload specs with their progress, their vCPU (of `vcpus`, round robin) and what the
/// sampler attributed to them (the guest names task `i` pid `i + 1`).
pub fn task_reports(
    specs: &[TaskSpec],
    progress: Vec<TaskProgress>,
    vcpus: usize,
    attributed: Option<&BTreeMap<u32, TaskTotals>>,
    guest: Option<&BTreeMap<u32, GuestTotals>>,
    memory: Option<&SharingReport>,
) -> Vec<TaskReport> {
    specs
        .iter()
        .zip(progress)
        .enumerate()
        .map(|(task, (spec, progress))| TaskReport {
            task,
            vcpu: task_vcpu(task, vcpus),
            host: attributed.map(|a| {
                a.get(&u32::try_from(task + 1).unwrap_or(u32::MAX))
                    .copied()
                    .unwrap_or_default()
            }),
            guest_min_flt: guest.map(|g| {
                g.get(&u32::try_from(task + 1).unwrap_or(u32::MAX))
                    .map_or(0, |t| t.min_flt)
            }),
            guest_cpu_ns: guest.map(|g| {
                g.get(&u32::try_from(task + 1).unwrap_or(u32::MAX))
                    .map_or(0, |t| t.cpu_ns)
            }),
            memory: memory.and_then(|m| m.ranges.iter().find(|r| r.index == task).cloned()),
            spec: spec.to_string(),
            iterations_planned: spec.iterations,
            progress,
        })
        .collect()
}

/// The per-task table printed after a workload run. Host figures are what the profiler's
/// sampler attributed to the task; without the profiler, the figures of the task's vCPU.
pub fn workload_summary(report: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} task(s) on {} vCPU(s), {} MiB guest RAM, host KVM: {}, {:.3} s",
        report.name,
        report.tasks.len(),
        report.vcpus.len(),
        report.mem_bytes >> 20,
        report.host,
        seconds(report.elapsed_ns)
    );
    let _ = writeln!(
        out,
        "{:>4} {:>4} {:<22} {:>7} {:>9} {:>12} {:>11} {:>11} {:>12} {:>7} {:>7} {:<7} {:>9} {:>9}",
        "task",
        "vcpu",
        "spec",
        "iters",
        "elapsed_s",
        "guest_minflt",
        "host_minflt",
        "host_majflt",
        "kvm_pf_taken",
        "exits",
        "cpu_s",
        "attr",
        "shared_pg",
        "private_pg"
    );
    for task in &report.tasks {
        let vcpu = report.vcpus.iter().find(|v| v.index == task.vcpu);
        let (minflt, majflt, pf, exits, cpu_ns, attr) = match (&task.host, vcpu) {
            (Some(h), _) => (
                h.host_min_flt,
                h.host_maj_flt,
                Some(h.pf_taken),
                h.exits,
                h.vcpu_cpu_ns,
                h.attribution(),
            ),
            (None, Some(v)) => (
                v.host_minor_faults,
                v.host_major_faults,
                v.kvm_stats.get("pf_taken").copied(),
                v.total_exits,
                v.user_ns + v.system_ns,
                "vcpu",
            ),
            (None, None) => (0, 0, None, 0, 0, "-"),
        };
        let _ = writeln!(
            out,
            "{:>4} {:>4} {:<22} {:>7} {:>9.3} {:>12} {:>11} {:>11} {:>12} {:>7} {:>7.2} {:<7} {:>9} {:>9}",
            task.task,
            task.vcpu,
            task.spec,
            format!("{}/{}", task.progress.iterations, task.iterations_planned),
            seconds(task.progress.elapsed_ns),
            task.guest_min_flt
                .map_or("-".to_string(), |v| v.to_string()),
            minflt,
            majflt,
            pf.map_or("-".to_string(), |v| v.to_string()),
            exits,
            seconds(cpu_ns),
            attr,
            task.memory
                .as_ref()
                .map_or("-".to_string(), |m| m.pages.shared.to_string()),
            task.memory
                .as_ref()
                .map_or("-".to_string(), |m| m.pages.private.to_string()),
        );
    }
    if let Some(h) = report.no_task.filter(|h| h.samples > 0) {
        let _ = writeln!(
            out,
            "{:>4} {:>4} {:<22} {:>7} {:>9} {:>12} {:>11} {:>11} {:>12} {:>7} {:>7.2} {:<7} {:>9} {:>9}",
            "-",
            "-",
            "(no task: boot, idle)",
            "-",
            "-",
            "-",
            h.host_min_flt,
            h.host_maj_flt,
            h.pf_taken,
            h.exits,
            seconds(h.vcpu_cpu_ns),
            h.attribution(),
            "-",
            "-",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_a_row_per_task_with_host_faults() {
        let specs: Vec<TaskSpec> = vec![
            "work 4 R 10".parse().expect("spec"),
            "work 4 L 10".parse().expect("spec"),
        ];
        let mut progress = vec![TaskProgress::default(); 2];
        progress[1].iterations = 20;
        let mut vcpus = vec![VcpuReport::default(), VcpuReport::default()];
        vcpus[1].index = 1;
        vcpus[1].host_minor_faults = 1234;
        vcpus[1].kvm_stats.insert("pf_taken".into(), 1240);
        let report = RunReport {
            name: "vm0".into(),
            end: (&VmEnd::WorkloadFinished).into(),
            guest: "workload",
            host: "pvm".into(),
            mem_bytes: 24 << 20,
            elapsed_ns: 1_500_000_000,
            vcpus,
            vm_kvm_stats: BTreeMap::new(),
            unhandled_exits: BTreeMap::new(),
            tasks: task_reports(
                &specs,
                progress,
                2,
                None,
                Some(&BTreeMap::from([(
                    2,
                    GuestTotals {
                        min_flt: 987_654,
                        cpu_ns: 1,
                    },
                )])),
                None,
            ),
            memory: None,
            no_task: None,
            profiler: None,
            profiler_device: None,
            guest_region: None,
            sampler: None,
            console: None,
            disk: None,
            end_reason: VmEnd::WorkloadFinished,
        };
        let text = workload_summary(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[3].contains("work 4 L 10") && lines[3].contains("20/20"),
            "{text}"
        );
        assert!(
            lines[3].contains("1234") && lines[3].contains("1240"),
            "{text}"
        );
        assert!(lines[1].contains("guest_minflt"), "{text}");
        assert!(
            lines[3].contains("987654"),
            "the guest's count of task 1 (pid 2): {text}"
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["end"]["kind"], "workload_finished");
        assert_eq!(json["tasks"][1]["iterations"], 20);
        assert_eq!(json["tasks"][1]["guest_min_flt"], 987_654);
        assert_eq!(
            json["tasks"][0]["guest_min_flt"], 0,
            "pid 1 wrote no sample"
        );
    }
}
