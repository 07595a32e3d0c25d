//! The figures gates and `vmm diff` judge, read from `--stats` JSON documents.
//!
//! Owns the figure catalogue ([`Figure`]: names, units, which exist per task) and the reading
//! of a stats document into per-VM reports ([`VmStats`]). A document is what `--stats` writes:
//! one VM's report (an object), a list of them, or an object with a `vms` list; each report may
//! carry its VM's name in `vm` (or `name`), else VMs are named `vm0`, `vm1`, … by position.
//! Everything here reads files a user hands over: every lookup is checked, nothing panics.
use std::fmt;
use std::path::Path;

use mirrorball_profiler::ExitKind;
use serde_json::Value;

use super::GateError;

/// One VM's `--stats` report, with its name.
#[derive(Clone, Debug, PartialEq)]
pub struct VmStats {
    /// The VM's name (`vm` in its report, else `vm<position>`).
    pub name: String,
    /// The report as `--stats` writes it.
    pub doc: Value,
}

/// Reads a stats document (see the module docs) from `path`.
pub fn load(path: &Path) -> Result<Vec<VmStats>, GateError> {
    let text = std::fs::read_to_string(path).map_err(|e| GateError::Stats {
        path: path.display().to_string(),
        problem: e.to_string(),
    })?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| GateError::Stats {
        path: path.display().to_string(),
        problem: format!("not JSON: {e}"),
    })?;
    vms_of(doc).map_err(|problem| GateError::Stats {
        path: path.display().to_string(),
        problem,
    })
}

/// Splits a stats document into its VMs.
pub fn vms_of(doc: Value) -> Result<Vec<VmStats>, String> {
    let list = match doc {
        Value::Array(list) => list,
        Value::Object(mut map) => match map.remove("vms") {
            Some(Value::Array(list)) => list,
            Some(_) => return Err("`vms` is not a list".into()),
            None => vec![Value::Object(map)],
        },
        _ => return Err("not a --stats document (expected an object or a list)".into()),
    };
    if list.is_empty() {
        return Err("holds no VM report".into());
    }
    let mut vms = Vec::with_capacity(list.len());
    for (i, doc) in list.into_iter().enumerate() {
        if !doc.is_object() || doc.get("vcpus").is_none() {
            return Err(format!(
                "entry {i} is not a VM report (no `vcpus`; was it written by --stats?)"
            ));
        }
        let name = ["vm", "name"]
            .iter()
            .find_map(|k| doc.get(*k).and_then(Value::as_str))
            .map_or_else(|| format!("vm{i}"), str::to_string);
        if vms.iter().any(|v: &VmStats| v.name == name) {
            return Err(format!("two VMs are named {name:?}"));
        }
        vms.push(VmStats { name, doc });
    }
    Ok(vms)
}

/// The VM of `others` that corresponds to `vm`: the one with its name, or the only one when
/// both sides have a single VM.
pub fn counterpart<'a>(vm: &VmStats, ours: usize, others: &'a [VmStats]) -> Option<&'a VmStats> {
    others
        .iter()
        .find(|o| o.name == vm.name)
        .or_else(|| (ours == 1 && others.len() == 1).then(|| &others[0]))
}

/// A figure of a VM (summed over its vCPUs or tasks) or of one guest task.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Figure {
    /// Guest minor faults (the guest's own count; OS-less guest: first touches).
    GuestMinorFaults,
    /// Guest major faults.
    GuestMajorFaults,
    /// Host minor faults charged to the vCPU threads.
    HostMinorFaults,
    /// Host major faults charged to the vCPU threads.
    HostMajorFaults,
    /// KVM `pf_taken`.
    PfTaken,
    /// KVM `pf_fixed` (VM level only: the sampler does not attribute it).
    PfFixed,
    /// KVM `exits`: every exit of the vCPUs, also those KVM handled itself.
    Exits,
    /// Exits that reached the VMM (KVM_RUN returned), all reasons (VM level only).
    VmmExits,
    /// Exits that reached the VMM for one reason (VM level only).
    ExitsBy(ExitKind),
    /// Any scalar per-vCPU KVM binary statistic, summed (VM level only).
    Kvm(String),
    /// vCPU-thread CPU time (user + system), seconds.
    CpuTime,
    /// vCPU-thread user CPU time, seconds (VM level only).
    UserTime,
    /// vCPU-thread system CPU time, seconds (VM level only).
    SystemTime,
    /// Wall time: the VM's vCPUs, or a task from `Started` to `Finished`, seconds.
    RunTime,
    /// Host-sampler records lost before the end-of-run attribution read them (VM level only).
    LostSamples,
    /// Host-sampler ticks that started more than a period late (VM level only).
    LateTicks,
    /// Host-sampler records attributed to the task (task level only).
    Samples,
    /// Iterations the task reported (task level only).
    Iterations,
}

/// Names of the fixed figures, in table order, with what they measure.
pub const FIXED_FIGURES: [(&str, &str); 17] = [
    (
        "guest_minor_faults",
        "guest minor faults (the guest's own count)",
    ),
    ("guest_major_faults", "guest major faults"),
    ("host_minor_faults", "host minor faults of the vCPU threads"),
    ("host_major_faults", "host major faults of the vCPU threads"),
    ("pf_taken", "KVM pf_taken"),
    ("pf_fixed", "KVM pf_fixed"),
    ("exits", "KVM exits (all, also those KVM handled itself)"),
    ("vmm_exits", "exits that reached the VMM"),
    ("cpu_time_s", "vCPU-thread CPU time, s"),
    ("user_time_s", "vCPU-thread user CPU time, s"),
    ("system_time_s", "vCPU-thread system CPU time, s"),
    ("run_time_s", "wall time, s"),
    ("lost_samples", "host-sampler records lost"),
    ("late_ticks", "host-sampler ticks started late"),
    ("samples", "host-sampler records attributed to the task"),
    ("iterations", "iterations the task reported"),
    (
        "exits.<reason>",
        "exits that reached the VMM for one reason; kvm.<stat>: a KVM statistic",
    ),
];

impl Figure {
    /// Parses a figure name: one of [`FIXED_FIGURES`], `exits.<reason>` or `kvm.<stat>`.
    pub fn parse(name: &str) -> Result<Self, String> {
        Ok(match name {
            "guest_minor_faults" => Self::GuestMinorFaults,
            "guest_major_faults" => Self::GuestMajorFaults,
            "host_minor_faults" => Self::HostMinorFaults,
            "host_major_faults" => Self::HostMajorFaults,
            "pf_taken" => Self::PfTaken,
            "pf_fixed" => Self::PfFixed,
            "exits" => Self::Exits,
            "vmm_exits" => Self::VmmExits,
            "cpu_time_s" => Self::CpuTime,
            "user_time_s" => Self::UserTime,
            "system_time_s" => Self::SystemTime,
            "run_time_s" => Self::RunTime,
            "lost_samples" => Self::LostSamples,
            "late_ticks" => Self::LateTicks,
            "samples" => Self::Samples,
            "iterations" => Self::Iterations,
            _ => {
                if let Some(reason) = name.strip_prefix("exits.") {
                    let kind = ExitKind::ALL
                        .into_iter()
                        .find(|k| k.name() == reason)
                        .ok_or_else(|| {
                            let names: Vec<&str> = ExitKind::ALL.iter().map(|k| k.name()).collect();
                            format!(
                                "unknown exit reason {reason:?} (known: {})",
                                names.join(", ")
                            )
                        })?;
                    Self::ExitsBy(kind)
                } else if let Some(stat) = name.strip_prefix("kvm.") {
                    let ok = !stat.is_empty()
                        && stat.len() <= 64
                        && stat
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    if !ok {
                        return Err(format!("{name:?} is not a KVM statistic name"));
                    }
                    Self::Kvm(stat.to_string())
                } else {
                    let names: Vec<&str> = FIXED_FIGURES.iter().map(|f| f.0).collect();
                    return Err(format!(
                        "unknown figure {name:?} (known: {}, kvm.<stat>)",
                        names.join(", ")
                    ));
                }
            }
        })
    }

    /// Whether the figure exists per guest task.
    pub fn per_task(&self) -> bool {
        matches!(
            self,
            Self::GuestMinorFaults
                | Self::GuestMajorFaults
                | Self::HostMinorFaults
                | Self::HostMajorFaults
                | Self::PfTaken
                | Self::Exits
                | Self::CpuTime
                | Self::RunTime
                | Self::Samples
                | Self::Iterations
        )
    }

    /// Whether the figure exists per VM.
    pub fn per_vm(&self) -> bool {
        !matches!(self, Self::Samples | Self::Iterations)
    }

    /// Whether the figure is a time in seconds (shown with decimals).
    pub fn is_seconds(&self) -> bool {
        matches!(
            self,
            Self::CpuTime | Self::UserTime | Self::SystemTime | Self::RunTime
        )
    }

    /// Formats a value of this figure.
    pub fn show(&self, value: f64) -> String {
        if self.is_seconds() {
            format!("{value:.3} s")
        } else if (value - value.round()).abs() < 1e-9 {
            format!("{value:.0}")
        } else {
            format!("{value:.1}")
        }
    }

    /// The figure's value for a whole VM.
    pub fn of_vm(&self, vm: &Value) -> Result<f64, String> {
        let vcpus = vm
            .get("vcpus")
            .and_then(Value::as_array)
            .ok_or("the report has no `vcpus` list")?;
        let sum_vcpus = |field: &[&str]| -> Result<f64, String> {
            let mut total = 0.0;
            for v in vcpus {
                total += number_at(v, field)
                    .ok_or_else(|| format!("a vCPU has no `{}`", field.join(".")))?;
            }
            Ok(total)
        };
        let sum_kvm = |stat: &str| -> Result<f64, String> {
            let mut seen = false;
            let mut total = 0.0;
            for v in vcpus {
                if let Some(n) = number_at(v, &["kvm_stats", stat]) {
                    seen = true;
                    total += n;
                }
            }
            seen.then_some(total)
                .ok_or_else(|| format!("no vCPU reports the KVM statistic `{stat}`"))
        };
        let tasks = vm.get("tasks").and_then(Value::as_array);
        let sum_guest = |major: bool| -> Result<f64, String> {
            let mut total = None;
            for t in tasks.into_iter().flatten() {
                if let Some(n) = guest_faults(t, major) {
                    total = Some(total.unwrap_or(0.0) + n);
                }
            }
            total.ok_or_else(|| {
                "the run has no guest fault counts (a workload run with the profiler on has them)"
                    .to_string()
            })
        };
        let ns = 1e9;
        match self {
            Self::GuestMinorFaults => sum_guest(false),
            Self::GuestMajorFaults => sum_guest(true),
            Self::HostMinorFaults => sum_vcpus(&["host_minor_faults"]),
            Self::HostMajorFaults => sum_vcpus(&["host_major_faults"]),
            Self::PfTaken => sum_kvm("pf_taken"),
            Self::PfFixed => sum_kvm("pf_fixed"),
            Self::Kvm(stat) => sum_kvm(stat),
            Self::Exits => sum_kvm("exits"),
            Self::VmmExits => sum_vcpus(&["total_exits"]),
            Self::ExitsBy(kind) => sum_vcpus(&["exits", kind.name()]),
            Self::CpuTime => Ok((sum_vcpus(&["user_ns"])? + sum_vcpus(&["system_ns"])?) / ns),
            Self::UserTime => Ok(sum_vcpus(&["user_ns"])? / ns),
            Self::SystemTime => Ok(sum_vcpus(&["system_ns"])? / ns),
            Self::RunTime => number_at(vm, &["elapsed_ns"])
                .map(|n| n / ns)
                .ok_or_else(|| "the report has no `elapsed_ns`".into()),
            Self::LostSamples => number_at(vm, &["sampler", "lost_records"]).ok_or_else(|| {
                "the run has no host-sampler loss count (profiler off?)".to_string()
            }),
            Self::LateTicks => number_at(vm, &["sampler", "late_ticks"])
                .ok_or_else(|| "the run has no host sampler (profiler off?)".to_string()),
            Self::Samples | Self::Iterations => {
                Err(format!("{self} is a per-task figure: name a task"))
            }
        }
    }

    /// The figure's value for one task of a VM's report (an entry of its `tasks`).
    pub fn of_task(&self, task: &Value) -> Result<f64, String> {
        let host = |field: &str| {
            number_at(task, &["host", field]).ok_or_else(|| {
                "the profiler attributed nothing to the task (profiler off?)".to_string()
            })
        };
        match self {
            Self::GuestMinorFaults | Self::GuestMajorFaults => {
                guest_faults(task, *self == Self::GuestMajorFaults)
                    .ok_or_else(|| "the task has no guest fault count (profiler off?)".into())
            }
            Self::HostMinorFaults => host("host_min_flt"),
            Self::HostMajorFaults => host("host_maj_flt"),
            Self::PfTaken => host("pf_taken"),
            Self::Exits => host("exits"),
            Self::CpuTime => host("vcpu_cpu_ns").map(|n| n / 1e9),
            Self::Samples => host("samples"),
            Self::RunTime => number_at(task, &["elapsed_ns"])
                .map(|n| n / 1e9)
                .ok_or_else(|| "the task has no `elapsed_ns`".into()),
            Self::Iterations => number_at(task, &["iterations"])
                .ok_or_else(|| "the task has no `iterations`".into()),
            _ => Err(format!("{self} is not measured per task, only per VM")),
        }
    }
}

/// A task's guest minor or major faults. The OS-less guest counts minor faults only (it has
/// no backing store): its major faults are 0 wherever its minor faults are reported.
fn guest_faults(task: &Value, major: bool) -> Option<f64> {
    let minor = number_at(task, &["guest_min_flt"]);
    if major {
        number_at(task, &["guest_maj_flt"]).or(minor.map(|_| 0.0))
    } else {
        minor
    }
}

/// The number at `path` in `doc`, if there is one.
fn number_at(doc: &Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .try_fold(doc, |d, key| d.get(*key))
        .and_then(Value::as_f64)
        .filter(|n| n.is_finite())
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ExitsBy(kind) => write!(f, "exits.{}", kind.name()),
            Self::Kvm(stat) => write!(f, "kvm.{stat}"),
            _ => {
                let name = match self {
                    Self::GuestMinorFaults => "guest_minor_faults",
                    Self::GuestMajorFaults => "guest_major_faults",
                    Self::HostMinorFaults => "host_minor_faults",
                    Self::HostMajorFaults => "host_major_faults",
                    Self::PfTaken => "pf_taken",
                    Self::PfFixed => "pf_fixed",
                    Self::Exits => "exits",
                    Self::VmmExits => "vmm_exits",
                    Self::CpuTime => "cpu_time_s",
                    Self::UserTime => "user_time_s",
                    Self::SystemTime => "system_time_s",
                    Self::RunTime => "run_time_s",
                    Self::LostSamples => "lost_samples",
                    Self::LateTicks => "late_ticks",
                    Self::Samples => "samples",
                    _ => "iterations",
                };
                f.write_str(name)
            }
        }
    }
}

/// A VM's tasks (the `tasks` list of its report; empty for Linux guests).
pub fn tasks(vm: &Value) -> &[Value] {
    vm.get("tasks")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// A task's index and spec, as its report gives them.
pub fn task_label(task: &Value) -> (Option<u64>, &str) {
    (
        task.get("task").and_then(Value::as_u64),
        task.get("spec").and_then(Value::as_str).unwrap_or("?"),
    )
}

/// The figures a VM-level table shows: the fixed ones, then exits by reason.
pub fn vm_table_figures() -> Vec<Figure> {
    let mut figures: Vec<Figure> = FIXED_FIGURES
        .iter()
        .filter_map(|(name, _)| Figure::parse(name).ok())
        .filter(Figure::per_vm)
        .collect();
    figures.extend(ExitKind::ALL.into_iter().map(Figure::ExitsBy));
    figures
}

/// The figures a task-level table shows.
pub fn task_table_figures() -> Vec<Figure> {
    FIXED_FIGURES
        .iter()
        .filter_map(|(name, _)| Figure::parse(name).ok())
        .filter(Figure::per_task)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn report() -> Value {
        json!({
            "end": {"kind": "workload_finished", "message": "workload finished", "exit_code": 0},
            "guest": "workload",
            "elapsed_ns": 2_000_000_000u64,
            "vcpus": [
                {"index": 0, "exits": {"io_in": 0, "mmio_write": 22}, "total_exits": 22,
                 "host_minor_faults": 100, "host_major_faults": 0, "user_ns": 500_000_000u64,
                 "system_ns": 250_000_000u64,
                 "kvm_stats": {"pf_taken": 90, "pf_fixed": 80, "exits": 200}},
                {"index": 1, "exits": {"io_in": 1, "mmio_write": 20}, "total_exits": 21,
                 "host_minor_faults": 50, "host_major_faults": 1, "user_ns": 0,
                 "system_ns": 250_000_000u64,
                 "kvm_stats": {"pf_taken": 10, "pf_fixed": 5, "exits": 100}}
            ],
            "tasks": [
                {"task": 0, "vcpu": 0, "spec": "work 1 R 10", "guest_min_flt": 256,
                 "host": {"host_min_flt": 99, "host_maj_flt": 0, "pf_taken": 88, "exits": 21,
                          "vcpu_cpu_ns": 700_000_000u64, "samples": 7},
                 "iterations": 20, "elapsed_ns": 1_500_000_000u64},
                {"task": 1, "vcpu": 1, "spec": "work 1 L 10", "guest_min_flt": 200,
                 "iterations": 20, "elapsed_ns": 1_000_000_000u64}
            ],
            "sampler": {"ticks": 40, "records": 80, "late_ticks": 2, "lost_records": 0}
        })
    }

    #[test]
    fn vm_figures_sum_the_vcpus_and_tasks() {
        let vm = report();
        let f = |name: &str| Figure::parse(name).expect(name).of_vm(&vm);
        assert_eq!(f("host_minor_faults"), Ok(150.0));
        assert_eq!(f("host_major_faults"), Ok(1.0));
        assert_eq!(f("pf_taken"), Ok(100.0));
        assert_eq!(f("pf_fixed"), Ok(85.0));
        assert_eq!(f("vmm_exits"), Ok(43.0));
        assert_eq!(f("exits"), Ok(300.0));
        assert_eq!(f("exits.mmio_write"), Ok(42.0));
        assert_eq!(f("guest_minor_faults"), Ok(456.0));
        assert_eq!(f("guest_major_faults"), Ok(0.0));
        assert_eq!(f("cpu_time_s"), Ok(1.0));
        assert_eq!(f("system_time_s"), Ok(0.5));
        assert_eq!(f("run_time_s"), Ok(2.0));
        assert_eq!(f("late_ticks"), Ok(2.0));
        assert_eq!(f("lost_samples"), Ok(0.0));
        assert!(f("kvm.halt_exits").unwrap_err().contains("halt_exits"));
        assert!(f("exits.hlt").unwrap_err().contains("exits.hlt"));
        assert!(f("samples").is_err());
    }

    #[test]
    fn task_figures_read_the_task_entry() {
        let vm = report();
        let t = &tasks(&vm)[0];
        let f = |name: &str| Figure::parse(name).expect(name).of_task(t);
        assert_eq!(f("guest_minor_faults"), Ok(256.0));
        assert_eq!(f("pf_taken"), Ok(88.0));
        assert_eq!(f("cpu_time_s"), Ok(0.7));
        assert_eq!(f("run_time_s"), Ok(1.5));
        assert_eq!(f("samples"), Ok(7.0));
        assert!(f("pf_fixed").unwrap_err().contains("only per VM"));
        let no_host = &tasks(&vm)[1];
        assert!(Figure::HostMinorFaults.of_task(no_host).is_err());
        assert_eq!(task_label(no_host), (Some(1), "work 1 L 10"));
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for f in vm_table_figures().iter().chain(&task_table_figures()) {
            assert_eq!(Figure::parse(&f.to_string()).as_ref(), Ok(f));
        }
        assert!(Figure::parse("guest_minor_fault")
            .unwrap_err()
            .contains("unknown figure"));
        assert!(Figure::parse("exits.bogus")
            .unwrap_err()
            .contains("unknown exit reason"));
        assert!(Figure::parse("kvm.Bad-Name").is_err());
        assert_eq!(
            Figure::parse("kvm.halt_exits"),
            Ok(Figure::Kvm("halt_exits".into()))
        );
    }

    #[test]
    fn documents_split_into_named_vms() {
        let one = vms_of(report()).expect("one");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "vm0");
        let mut named = report();
        named["vm"] = json!("web");
        let fleet = vms_of(json!({"vms": [named.clone(), report()]})).expect("fleet");
        assert_eq!(
            fleet.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["web", "vm1"]
        );
        let list = vms_of(json!([report(), report()])).expect("list");
        assert_eq!(list[1].name, "vm1");
        assert!(vms_of(json!([named.clone(), named])).is_err(), "duplicate");
        assert!(vms_of(json!([])).is_err());
        assert!(vms_of(json!(3)).is_err());
        assert!(vms_of(json!({"x": 1})).unwrap_err().contains("vcpus"));
        let other = vms_of(json!([report()])).expect("list");
        assert_eq!(
            counterpart(&fleet[0], 2, &other).map(|v| &v.name),
            None,
            "two VMs vs one: by name only"
        );
        assert_eq!(
            counterpart(&one[0], 1, &other).map(|v| v.name.as_str()),
            Some("vm0")
        );
    }
}
