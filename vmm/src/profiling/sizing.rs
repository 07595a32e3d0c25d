//! How big a VM's profiler regions are: sized from what the run needs — the sampling rate times
//! how long the rings keep records ([`RETENTION`]), the guest's tasks and the vCPUs — instead of
//! one size for every run. The defaults (20 Hz) come to well under 2 MiB per VM.
use std::time::Duration;

use mirrorball_profiler_abi::MAX_TASKS;

/// How long the rings keep records for readers (`vmm record`, `top`) that fall behind.
pub const RETENTION: Duration = Duration::from_secs(30);
/// Fewest ticks a ring holds, whatever the rate.
const MIN_TICKS: u64 = 256;
/// Most ticks a ring holds (60 s at 1 kHz).
const MAX_TICKS: u64 = 60_000;
/// Tasks the Linux driver is assumed to sample per tick, when the tasks are not known ahead.
pub const ASSUMED_GUEST_TASKS: u32 = 16;
/// Tasks assumed to run on one vCPU between two ticks, when not known ahead.
const ASSUMED_TASKS_PER_VCPU: u32 = 3;
/// Task-table entries when the tasks are not known ahead (a Linux guest).
pub const DEFAULT_TASK_CAPACITY: u32 = 256;
/// Most records of one ring.
const MAX_RING_RECORDS: u64 = 1 << 22;

/// The capacities of one VM's regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSizing {
    /// Entries of the guest region's task table.
    pub task_capacity: u32,
    /// Records of the guest ring.
    pub guest_ring_records: u32,
    /// Records of the host ring.
    pub host_ring_records: u32,
}

impl RegionSizing {
    /// For `vcpus` vCPUs sampled every `period_ns`, running `tasks` guest tasks if known (the
    /// OS-less guest) or any number (Linux).
    ///
    /// The host ring gets, per tick and vCPU, one record plus one per task that may run on it
    /// (exact attribution writes one record per task a vCPU ran since the last tick); the guest
    /// ring one sample per task and tick (the OS-less guest writes one per task iteration, which
    /// is no more often for tasks worth profiling).
    pub fn for_run(vcpus: u32, tasks: Option<u32>, period_ns: u64) -> Self {
        let vcpus = u64::from(vcpus.max(1));
        let ticks = (u64::try_from(RETENTION.as_nanos()).unwrap_or(u64::MAX) / period_ns.max(1))
            .clamp(MIN_TICKS, MAX_TICKS);
        let per_vcpu = tasks.map_or(u64::from(ASSUMED_TASKS_PER_VCPU), |t| {
            u64::from(t).div_ceil(vcpus).min(63)
        });
        let host = ticks * vcpus * (1 + per_vcpu);
        let guest = ticks * u64::from(tasks.unwrap_or(ASSUMED_GUEST_TASKS).max(1));
        let ring = |n: u64| n.clamp(1024, MAX_RING_RECORDS) as u32;
        Self {
            task_capacity: tasks.map_or(DEFAULT_TASK_CAPACITY, |t| {
                t.checked_next_power_of_two()
                    .unwrap_or(MAX_TASKS)
                    .clamp(16, MAX_TASKS)
            }),
            guest_ring_records: ring(guest),
            host_ring_records: ring(host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorball_profiler_abi::{GuestRegionLayout, HostRegionLayout};

    fn bytes(vcpus: u32, s: RegionSizing) -> usize {
        let guest = GuestRegionLayout::new(vcpus, s.task_capacity, s.guest_ring_records)
            .expect("guest layout");
        let host = HostRegionLayout::new(vcpus, s.host_ring_records).expect("host layout");
        guest.size + host.size
    }

    #[test]
    fn the_default_runs_need_at_most_2_mib_per_vm() {
        let period = 50_000_000;
        // The default workload (2 tasks on 2 vCPUs), a Linux guest on 1 and on 4 vCPUs.
        for (vcpus, tasks) in [(2, Some(2)), (1, None), (4, None), (1, Some(16))] {
            let s = RegionSizing::for_run(vcpus, tasks, period);
            let b = bytes(vcpus, s);
            assert!(
                b <= 2 << 20,
                "{vcpus} vCPUs, {tasks:?} tasks: {b} bytes ({s:?})"
            );
        }
    }

    #[test]
    fn published_regions_of_a_default_linux_vm_take_at_most_2_mib() {
        let dir = std::env::temp_dir().join(format!("mb-sizing-{}", std::process::id()));
        let regions =
            crate::profiling::regions::ProfilerRegions::create(&dir, 1, "linux", 50_000_000)
                .expect("regions");
        let total = regions.guest.len() + regions.host.len();
        assert!(total <= 2 << 20, "{total} bytes of shared memory per VM");
    }

    #[test]
    fn rings_grow_with_rate_tasks_and_vcpus_and_keep_the_retention() {
        let slow = RegionSizing::for_run(1, Some(2), 50_000_000);
        let fast = RegionSizing::for_run(1, Some(2), 1_000_000);
        assert!(fast.host_ring_records > slow.host_ring_records * 40);
        // At 1 kHz: 30 s of one record per tick for the vCPU and one per task.
        assert_eq!(fast.host_ring_records, 30_000 * 3);
        let wide = RegionSizing::for_run(4, Some(16), 50_000_000);
        assert_eq!(wide.host_ring_records, 600 * 4 * 5);
        assert_eq!(wide.guest_ring_records, 600 * 16);
        assert_eq!(wide.task_capacity, 16);
        // Never below a floor, never above the ABI's limits, even for absurd inputs.
        let tiny = RegionSizing::for_run(1, Some(1), u64::MAX);
        assert_eq!(tiny.guest_ring_records, 1024);
        let huge = RegionSizing::for_run(4096, Some(u32::MAX), 1);
        assert!(u64::from(huge.host_ring_records) <= MAX_RING_RECORDS);
        assert!(HostRegionLayout::new(4096, huge.host_ring_records).is_ok());
    }
}
