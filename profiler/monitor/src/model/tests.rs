//! Unit tests of the aggregation model.
use super::*;

const MS: u64 = 1_000_000;
const ID: VmId = VmId { pid: 1, n: 0 };

fn guest(ts_ms: u64, task_id: u32, pid: u32, min: u64, maj: u64, cpu_ms: u64) -> GuestSample {
    GuestSample {
        timestamp_ns: ts_ms * MS,
        task_id,
        pid,
        min_flt: min,
        maj_flt: maj,
        utime_ns: cpu_ms * MS * 3 / 4,
        stime_ns: cpu_ms * MS / 4,
        cpu: 0,
        flags: 0,
    }
}

fn host(vcpu: u32, task_id: u32, pid: u32, interval_ms: u64, pf: u64, cpu_ms: u64) -> HostSample {
    HostSample {
        timestamp_ns: 0,
        task_id,
        pid,
        vcpu,
        attr_flags: mirrorball_profiler_abi::ATTR_SLOT_VALID,
        interval_ns: interval_ms * MS,
        pf_taken: pf,
        pf_fixed: pf / 2,
        exits: 3,
        host_min_flt: 1,
        host_maj_flt: 0,
        vcpu_utime_ns: cpu_ms * MS / 2,
        vcpu_stime_ns: cpu_ms * MS / 2,
        guest_switch_count: 0,
        ..HostSample::default()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6 * b.abs().max(1.0)
}

#[test]
fn guest_rates_come_from_absolute_counter_deltas() {
    let mut m = VmModel::new(ID, ModelConfig::default());
    m.ingest_guest(&guest(1000, 0, 10, 100, 0, 0));
    m.ingest_guest(&guest(1250, 0, 10, 350, 5, 50));
    m.ingest_guest(&guest(1500, 0, 10, 600, 10, 250));
    m.end_window();
    let t = &m.tasks[&TaskKey {
        task_id: 0,
        pid: 10,
    }];
    assert!(close(t.rates.min_flt, 1000.0), "{:?}", t.rates);
    assert!(close(t.rates.maj_flt, 20.0));
    assert!(close(t.rates.cpu, 0.5));
    assert_eq!((t.min_flt, t.maj_flt), (600, 10));
    // Next window continues from the last sample of the previous one.
    m.ingest_guest(&guest(2500, 0, 10, 700, 10, 250));
    m.end_window();
    let t = &m.tasks[&TaskKey {
        task_id: 0,
        pid: 10,
    }];
    assert!(close(t.rates.min_flt, 100.0));
    assert!(close(t.rates.maj_flt, 0.0));
    assert!(close(t.rates.cpu, 0.0));
    // No new sample: zero.
    m.end_window();
    let t = &m.tasks[&TaskKey {
        task_id: 0,
        pid: 10,
    }];
    assert_eq!(t.rates, TaskRates::default());
    assert_eq!(t.history.min_flt.values().collect::<Vec<_>>().len(), 3);
    assert!(close(m.history.guest_flt.values().next().unwrap(), 1020.0));
}

#[test]
fn a_single_sample_gives_no_rate() {
    let mut m = VmModel::new(ID, ModelConfig::default());
    m.ingest_guest(&guest(1000, 0, 10, 1_000_000, 0, 0));
    m.end_window();
    assert_eq!(m.rates.min_flt, 0.0);
}

#[test]
fn backward_counters_start_a_new_baseline() {
    let mut m = VmModel::new(ID, ModelConfig::default());
    m.ingest_guest(&guest(1000, 0, 10, 1_000_000, 50, 900));
    m.ingest_guest(&guest(1100, 0, 10, 5, 0, 0));
    m.ingest_guest(&guest(1600, 0, 10, 105, 0, 0));
    m.end_window();
    let t = &m.tasks[&TaskKey {
        task_id: 0,
        pid: 10,
    }];
    assert_eq!(t.resets, 1);
    assert!(close(t.rates.min_flt, 200.0), "{:?}", t.rates);
    // Timestamps going backwards too.
    m.ingest_guest(&guest(10, 0, 10, 200, 0, 0));
    m.end_window();
    let t = &m.tasks[&TaskKey {
        task_id: 0,
        pid: 10,
    }];
    assert_eq!(t.resets, 2);
    assert!(t.rates.min_flt.is_finite() && t.rates.min_flt >= 0.0);
}

#[test]
fn host_costs_are_charged_to_the_attributed_task() {
    let mut m = VmModel::new(ID, ModelConfig::default());
    for _ in 0..10 {
        m.ingest_host(&host(0, 0, 10, 50, 5, 25));
        m.ingest_host(&host(1, 1, 11, 50, 1, 50));
    }
    m.ingest_host(&host(1, TASK_NONE, 99, 0, 7, 0));
    m.end_window();
    let a = &m.tasks[&TaskKey {
        task_id: 0,
        pid: 10,
    }];
    let b = &m.tasks[&TaskKey {
        task_id: 1,
        pid: 11,
    }];
    let none = &m.tasks[&TaskKey::UNATTRIBUTED];
    // Wall time 0.5 s: the longest sum of intervals of one vCPU.
    assert!(close(a.rates.ept, 100.0), "{:?}", a.rates);
    assert!(close(b.rates.ept, 20.0));
    assert!(close(none.rates.ept, 14.0));
    assert_eq!(none.label(), "(no task)");
    assert!(close(a.rates.vcpu, 0.5));
    assert!(close(b.rates.vcpu, 1.0));
    assert_eq!(a.host.pf_taken, 50);
    let v0 = &m.vcpus[&0];
    let v1 = &m.vcpus[&1];
    assert!(close(v0.rates.util, 0.5));
    assert!(close(v0.rates.user, 0.25));
    assert!(close(v1.rates.util, 1.0));
    assert!(close(v0.rates.ept, 100.0));
    assert!(close(v1.rates.ept, 34.0));
    assert!(close(v0.rates.exits, 60.0));
    assert!(close(m.rates.ept, 134.0));
    assert!(close(m.rates.vcpu_util, 1.5));
    assert_eq!(m.host.pf_taken, 50 + 10 + 7);
    assert_eq!(v1.last_task, TaskKey::UNATTRIBUTED);
    // A later empty window: zero rates, totals kept.
    m.end_window();
    assert_eq!(m.vcpus[&0].rates, VcpuRates::default());
    assert_eq!(m.vcpus[&0].totals.pf_taken, 50);
}

#[test]
fn histories_are_capped() {
    let cfg = ModelConfig {
        history: 5,
        ..ModelConfig::default()
    };
    let mut m = VmModel::new(ID, cfg);
    for i in 0..20u64 {
        m.ingest_guest(&guest(i * 100, 0, 1, i * 10, 0, 0));
        m.ingest_host(&host(0, 0, 1, 100, i, 0));
        m.end_window();
    }
    let t = &m.tasks[&TaskKey { task_id: 0, pid: 1 }];
    assert_eq!(t.history.min_flt.len(), 5);
    assert_eq!(
        t.history.ept.values().collect::<Vec<_>>(),
        vec![150.0, 160.0, 170.0, 180.0, 190.0]
    );
    assert_eq!(m.history.ept.len(), 5);
    assert_eq!(m.vcpus[&0].history.ept.len(), 5);
    let mut h = History::new(2);
    h.push(f64::NAN);
    h.push(f64::INFINITY);
    assert_eq!(h.values().collect::<Vec<_>>(), vec![0.0, 0.0]);
}

#[test]
fn invented_tasks_are_bounded_and_old_ones_expire() {
    let cfg = ModelConfig {
        history: 4,
        max_tasks: 8,
        expire_windows: 2,
    };
    let mut m = VmModel::new(ID, cfg);
    for i in 0..1000u32 {
        m.ingest_guest(&guest(1, i, i, 1, 1, 1));
    }
    assert_eq!(m.tasks.len(), 8);
    assert_eq!(m.dropped, 992);
    m.end_window();
    // New window: the old tasks make room for new ones.
    for i in 1000..1004u32 {
        m.ingest_guest(&guest(1, i, i, 1, 1, 1));
    }
    assert!(m.tasks.contains_key(&TaskKey {
        task_id: 1003,
        pid: 1003
    }));
    assert!(m.tasks.len() <= 8);
    for _ in 0..4 {
        m.end_window();
    }
    assert!(m.tasks.is_empty());
    m.ingest_host(&host(MAX_VCPUS, 0, 0, 1, 1, 1));
    assert!(m.vcpus.is_empty());
}

#[test]
fn names_and_batches() {
    let mut m = Model::new(ModelConfig::default());
    let vm = m.vm_mut(ID);
    vm.ingest_batch(&Batch {
        guest: vec![mirrorball_profiler_abi::SeqRecord {
            seq: 1,
            record: guest(1, 2, 3, 4, 5, 6),
        }],
        lost_guest: 7,
        lost_host: 8,
        ..Batch::default()
    });
    let key = TaskKey { task_id: 2, pid: 3 };
    assert_eq!(vm.unnamed_tasks(), vec![key]);
    vm.set_comm(key, "work".into());
    assert!(vm.unnamed_tasks().is_empty());
    assert_eq!(vm.tasks[&key].label(), "work");
    assert_eq!((vm.lost_guest, vm.lost_host), (7, 8));
    m.end_window();
    assert_eq!(m.vms[&ID].windows, 1);
    m.remove(ID);
    assert!(m.vms.is_empty());
}
