//! Helpers shared by the monitor's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use mirrorball_monitor::publish::{PublishSpec, PublishedVm};
use mirrorball_profiler_abi::{comm_from, Attribution, CurrentTask, GuestSample, HostSample};

/// A fresh, empty directory under the target's temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mirrorball-monitor-{}-{}-{}",
        name,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// xorshift64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A synthetic VM: `tasks` tasks on `vcpus` vCPUs whose faults grow at known rates.
pub struct Synthetic {
    pub vm: PublishedVm,
    pub tasks: Vec<(u32, u32, String)>,
    pub vcpus: u32,
    pub tick: u64,
    pub period_ns: u64,
}

pub const T0: u64 = 1_000_000_000;

impl Synthetic {
    pub fn new(dir: &std::path::Path, n: u32, vcpus: u32, tasks: u32) -> Self {
        let vm = PublishedVm::create(
            dir,
            &PublishSpec {
                n,
                name: format!("synthetic-{n}"),
                vcpus,
                tasks: tasks.max(4),
                guest_ring: 8192,
                host_ring: 8192,
                ..PublishSpec::default()
            },
        )
        .expect("publish");
        let mut list = Vec::new();
        {
            let g = vm.guest().expect("guest");
            let mut table = g.task_table();
            for i in 0..tasks {
                let pid = 200 + i;
                let name = format!("work-{i}");
                let id = table
                    .register(pid, pid, &comm_from(name.as_bytes()), T0)
                    .expect("register");
                list.push((id, pid, name));
            }
        }
        Self {
            vm,
            tasks: list,
            vcpus,
            tick: 0,
            period_ns: 50_000_000,
        }
    }

    /// One sampling period: task i makes (i + 1) * 100 minor faults and i major faults, and
    /// uses half a CPU; vCPU v runs task v (if any) and takes (i + 1) * 100 + 1 pf_taken.
    pub fn step(&mut self) {
        self.tick += 1;
        let k = self.tick;
        let now = T0 + k * self.period_ns;
        let g = self.vm.guest().expect("guest");
        let h = self.vm.host().expect("host");
        let view = g.view().expect("view");
        let mut gw = g.ring_writer().expect("ring");
        let mut hw = h.ring_writer().expect("ring");
        for (i, (id, pid, name)) in self.tasks.iter().enumerate() {
            let i = i as u64;
            if u32::try_from(i).expect("fits") < self.vcpus {
                g.vcpu_writer(u32::try_from(i).expect("fits"))
                    .expect("slot")
                    .switch_to(
                        &CurrentTask {
                            task_id: *id,
                            pid: *pid,
                            tgid: *pid,
                            flags: 0,
                            comm: comm_from(name.as_bytes()),
                        },
                        now,
                    );
            }
            gw.push(&GuestSample {
                timestamp_ns: now,
                task_id: *id,
                pid: *pid,
                min_flt: k * (i + 1) * 100,
                maj_flt: k * i,
                utime_ns: k * self.period_ns / 4,
                stime_ns: k * self.period_ns / 4,
                cpu: u32::try_from(i).expect("fits"),
                flags: 0,
            });
        }
        for v in 0..self.vcpus {
            let mut s = HostSample {
                timestamp_ns: now,
                vcpu: v,
                interval_ns: self.period_ns,
                pf_taken: (u64::from(v) + 1) * 100 + 1,
                pf_fixed: 1,
                exits: 5,
                host_min_flt: 2,
                vcpu_utime_ns: self.period_ns / 2,
                vcpu_stime_ns: self.period_ns / 4,
                ..HostSample::default()
            };
            s.set_attribution(&Attribution::from_slot(view.vcpu(v), None));
            hw.push(&s);
        }
    }

    /// A memory record: `breaks` copy-on-write breaks charged to task `i` (as the VMM's sampler
    /// writes them after a sharing scan).
    pub fn cow(&mut self, i: usize, breaks: u64) {
        let (id, pid, _) = self.tasks[i].clone();
        let h = self.vm.host().expect("host");
        let mut hw = h.ring_writer().expect("ring");
        let mut s = HostSample {
            timestamp_ns: T0 + self.tick * self.period_ns,
            vcpu: 0,
            cow_breaks: breaks,
            ..HostSample::default()
        };
        s.set_attribution(&Attribution {
            task_id: id,
            pid,
            attr_flags: mirrorball_profiler_abi::ATTR_SLOT_VALID
                | mirrorball_profiler_abi::ATTR_EXACT
                | mirrorball_profiler_abi::ATTR_MEMORY,
            guest_switch_count: 0,
            slot_flags: 0,
        });
        hw.push(&s);
    }
}
