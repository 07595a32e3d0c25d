//! KVM tests of the embedded OS-less workload guest: host faults land on the vCPU whose task
//! touched the memory, progress arrives through the doorbell, and the default job runs.
mod common;

use std::time::Duration;

use common::{kvm_available, run_vmm, temp_file, text};

const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn touched_pages_are_charged_to_the_right_vcpu() {
    if !kvm_available("touched_pages_are_charged_to_the_right_vcpu") {
        return;
    }
    // Task 0 touches every page of 8 MiB (200k uniform accesses over 2,048 pages); task 1 at most
    // 50 pages of its 1 MiB.
    let pages_task0 = 8 * 256;
    let stats = temp_file("faults", "stats.json", b"");
    let out = run_vmm(
        &[
            "--workload",
            "work 8 R 200000 2",
            "--workload",
            "work 1 R 50 1",
            "--stats",
            stats.to_str().expect("utf-8"),
        ],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats).expect("stats")).expect("json");
    let vcpu = |i: usize| &json["vcpus"][i];
    let faults = |i: usize| vcpu(i)["host_minor_faults"].as_u64().expect("faults");
    assert!(
        faults(0) >= pages_task0,
        "vCPU 0 was charged {} faults for {pages_task0} pages",
        faults(0)
    );
    assert!(
        faults(1) < pages_task0 / 8,
        "vCPU 1 was charged {} faults for <= 50 pages",
        faults(1)
    );
    assert_eq!(json["tasks"][0]["iterations"], 2);
    assert_eq!(json["tasks"][1]["iterations"], 1);
    assert_eq!(json["tasks"][0]["finished"], true);
    assert_eq!(json["end"]["kind"], "workload_finished");
    // Each iteration rings the doorbell: Started + 2 iterations + Finished on vCPU 0.
    assert!(
        vcpu(0)["exits"]["mmio_write"].as_u64().unwrap_or(0) >= 4,
        "{}",
        vcpu(0)
    );
}

#[test]
fn default_job_prints_a_summary_row_per_task() {
    if !kvm_available("default_job_prints_a_summary_row_per_task") {
        return;
    }
    let out = run_vmm(&[], DEADLINE);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains("work 64")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows.iter().all(|r| r.contains("20/20")), "{stdout}");
    // Both layers: `work 64 …` touches all 16,384 pages of its 64 MiB, so the guest counts
    // 16,384 first touches (guest_minflt) and the host at least as many faults (host_minflt).
    let header: Vec<&str> = stdout
        .lines()
        .find(|l| l.contains("guest_minflt"))
        .expect("header")
        .split_whitespace()
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name).expect(name);
    for row in &rows {
        // The spec column has spaces ("work 64 R 100000"): count fields from the right.
        let fields: Vec<&str> = row.split_whitespace().collect();
        let from_end = |name: &str| fields[fields.len() - (header.len() - column(name))];
        let guest: u64 = from_end("guest_minflt").parse().expect("guest_minflt");
        let host: u64 = from_end("host_minflt").parse().expect("host_minflt");
        assert_eq!(guest, 16_384, "{row}");
        assert!(host >= guest, "{row}");
    }
    assert!(text(&out.stderr).contains("workload finished"));
}

#[test]
fn vcpu_count_must_match_the_tasks() {
    if !kvm_available("vcpu_count_must_match_the_tasks") {
        return;
    }
    // More vCPUs than tasks is refused by the VMM before the guest starts.
    let out = run_vmm(
        &[
            "--workload",
            "work 1 R 1",
            "--workload",
            "work 1 L 1",
            "--vcpus",
            "3",
        ],
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("every vCPU needs a task"));
}
