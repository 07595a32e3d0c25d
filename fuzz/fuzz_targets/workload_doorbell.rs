//! The OS-less workload guest's doorbell: any sequence of MMIO writes from any vCPU (in range or
//! not), at the doorbell or elsewhere, of any length and value, into `WorkloadMonitor`; plus the
//! guest-side decoding of doorbell values and of the parameter block (`Event::decode`,
//! `validate`) on arbitrary bytes.
//!
//! Input: the first byte is the monitor's task count (0..=MAX_TASKS+1), the second how tasks map
//! to vCPUs (one each, or round robin on 1..=4 vCPUs), then operations, each starting with an
//! opcode byte (`op % 8`):
//! * 0..=2: a 4-byte write to a task's doorbell — task byte, vCPU byte, 4 value bytes
//! * 3: a write of 0..=15 bytes at the doorbell or near it or anywhere — vCPU, address, data
//! * 4: `progress()`, checked against a model of what the events so far should have produced
//! * 5: the other exits (`io_in`, `io_out`, `mmio_read`), which must go to the inner handler
//! * 6: `Event::decode` of 4 bytes; a decoded event re-encodes to the same value (less the
//!   argument bits of `Started`, which has none)
//! * 7: a `Params` block built from the following bytes (each task's fields, then a page-bitmap
//!   selector: none, right after the region, or two arbitrary words) and `validate` of a task
//!   index, against the documented rules (`task_ok`)
//!
//! The monitor's answers (continue, stop this vCPU, end the VM and why) and every task's progress
//! are compared with a model built from the documented event semantics.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mirrorball_fuzz::Bytes;
use mirrorball_workload::{
    bad_params, doorbell_gpa, doorbell_task, validate, AccessStream, Event, PageTracker, Params,
    Pattern, TaskParams, DOORBELL_GPA, MAX_TASKS, PARAMS_MAGIC, PARAMS_VERSION, TASK_READ_ONLY,
};
use vmm::exit::VmEnd;
use vmm::vstate::vcpu::{ExitHandler, VcpuAction};
use vmm::workload::WorkloadMonitor;

/// The device handler behind the monitor: does nothing but count what reaches it.
#[derive(Default)]
struct Inner {
    calls: AtomicU64,
}

impl Inner {
    fn seen(&self) -> VcpuAction {
        self.calls.fetch_add(1, Ordering::Relaxed);
        VcpuAction::Continue
    }
}

impl ExitHandler for Inner {
    fn io_in(&self, _: usize, _: u16, _: &mut [u8]) -> VcpuAction {
        self.seen()
    }
    fn io_out(&self, _: usize, _: u16, _: &[u8]) -> VcpuAction {
        self.seen()
    }
    fn mmio_read(&self, _: usize, _: u64, _: &mut [u8]) -> VcpuAction {
        self.seen()
    }
    fn mmio_write(&self, _: usize, _: u64, _: &[u8]) -> VcpuAction {
        self.seen()
    }
}

/// What the model expects one task's progress to be.
#[derive(Clone, Default, Debug)]
struct Model {
    iterations: u32,
    finished: bool,
    checksum: u32,
    bad_events: u64,
    started: bool,
}

/// The documented effect of `value` at task `index`'s doorbell, written from `vcpu`, on the
/// model, and the answer expected: only the task's own vCPU counts; a vCPU stops when all its
/// tasks finished, the VM when all tasks did.
fn model_event(
    tasks: &mut [Model],
    task_vcpus: &[usize],
    vcpu: usize,
    index: usize,
    value: u32,
) -> VcpuAction {
    if task_vcpus.get(index) != Some(&vcpu) {
        return VcpuAction::Continue;
    }
    let Some(task) = tasks.get_mut(index) else {
        return VcpuAction::Continue;
    };
    match value >> 24 {
        1 => task.started = true,
        2 => task.iterations = value & 0xff_ffff,
        3 => {
            task.finished = true;
            task.checksum = value & 0xff_ffff;
            return if tasks.iter().all(|t| t.finished) {
                VcpuAction::StopVm(VmEnd::WorkloadFinished)
            } else if tasks
                .iter()
                .zip(task_vcpus)
                .all(|(t, &v)| v != vcpu || t.finished)
            {
                VcpuAction::StopVcpu
            } else {
                VcpuAction::Continue
            };
        }
        4 => {
            return VcpuAction::StopVm(VmEnd::WorkloadBadParams {
                vcpu,
                code: value & 0xff_ffff,
            })
        }
        _ => task.bad_events += 1,
    }
    VcpuAction::Continue
}

fn vcpu(input: &mut Bytes) -> usize {
    // Mostly small indexes (in range or just past it), sometimes anything.
    match input.u8() {
        0xff => input.u64() as usize,
        b => usize::from(b % (MAX_TASKS as u8 + 8)),
    }
}

fn check_progress(monitor: &WorkloadMonitor, model: &[Model]) {
    let progress = monitor.progress();
    assert_eq!(progress.len(), model.len());
    for (i, (p, m)) in progress.iter().zip(model).enumerate() {
        assert_eq!(
            (p.iterations, p.finished, p.checksum, p.bad_events),
            (m.iterations, m.finished, m.checksum, m.bad_events),
            "task {i}"
        );
        if !m.started {
            assert_eq!(p.elapsed_ns, 0, "task {i} never started");
        }
    }
}

/// A parameter block from the input: header fields (often the valid ones, so the fuzzer gets
/// past the header check without guessing), then a few tasks at chosen slots.
fn params(input: &mut Bytes) -> Params {
    let flags = input.u8();
    let mut p = Params {
        magic: if flags & 1 == 0 {
            PARAMS_MAGIC
        } else {
            input.u32()
        },
        version: if flags & 2 == 0 {
            PARAMS_VERSION
        } else {
            input.u32()
        },
        task_count: if flags & 4 == 0 {
            u32::from(input.below(MAX_TASKS as u8 + 4))
        } else {
            input.u32()
        },
        reserved: 0,
        ..Params::default()
    };
    for _ in 0..input.below(4) {
        let slot = usize::from(input.below(MAX_TASKS as u8));
        let mut t = TaskParams {
            region_gpa: input.u64(),
            region_bytes: input.u64(),
            accesses_per_iteration: input.u64(),
            seed: input.u64(),
            iterations: input.u32(),
            pattern: input.u32(),
            vcpu: input.u32(),
            flags: match input.below(3) {
                0 => 0,
                1 => TASK_READ_ONLY,
                _ => input.u32(),
            },
            bitmap_gpa: 0,
            bitmap_bytes: 0,
        };
        // The page bitmap: none, right after the region and just big enough (what the VMM
        // gives), or anything.
        match input.below(3) {
            0 => {}
            1 => {
                t.bitmap_gpa = t.region_gpa.wrapping_add(t.region_bytes);
                t.bitmap_bytes = PageTracker::bitmap_bytes(t.region_bytes);
            }
            _ => {
                t.bitmap_gpa = input.u64();
                t.bitmap_bytes = input.u64();
            }
        }
        p.tasks[slot] = t;
    }
    p
}

/// The documented rules for one task: a non-empty region that does not wrap past the top of
/// the address space, a known pattern, no flag but `TASK_READ_ONLY`, and either no bitmap or one that does not wrap, covers a
/// bit per page of the region, fits in memory and does not overlap the region.
fn task_ok(t: &TaskParams) -> bool {
    let Some(region_end) = t.region_gpa.checked_add(t.region_bytes) else {
        return false;
    };
    let bitmap_ok = t.bitmap_gpa == 0
        || t.bitmap_gpa.checked_add(t.bitmap_bytes).is_some_and(|bitmap_end| {
            t.bitmap_bytes >= PageTracker::bitmap_bytes(t.region_bytes)
                && usize::try_from(t.bitmap_bytes).is_ok()
                && !(t.bitmap_gpa < region_end && t.region_gpa < bitmap_end)
        });
    t.region_bytes != 0 && t.pattern <= 1 && t.flags & !TASK_READ_ONLY == 0 && bitmap_ok
}

fn check_validate(input: &mut Bytes) {
    let p = params(input);
    let task = match input.u8() {
        0xff => input.u64() as usize,
        b => usize::from(b % (MAX_TASKS as u8 + 4)),
    };
    let expected = if p.magic != PARAMS_MAGIC || p.version != PARAMS_VERSION {
        Err(bad_params::HEADER)
    } else if task >= (p.task_count as usize).min(MAX_TASKS) {
        Err(bad_params::TASK_INDEX)
    } else if !task_ok(&p.tasks[task]) {
        Err(bad_params::TASK)
    } else {
        Ok(p.tasks[task])
    };
    let got = validate(&p, task);
    assert_eq!(got, expected, "task {task}");
    // What the guest then does with valid parameters: the access stream stays in its region.
    if let Ok(t) = got {
        let pattern = Pattern::from_raw(t.pattern).expect("validated pattern");
        let mut stream = AccessStream::new(pattern, t.region_bytes, t.seed)
            .with_writes(t.flags & TASK_READ_ONLY == 0);
        for _ in 0..64 {
            let offset = stream.next_offset();
            assert!(
                offset < t.region_bytes,
                "{offset:#x} of {:#x}",
                t.region_bytes
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes::new(data);
    let count = usize::from(input.below(MAX_TASKS as u8 + 2));
    let task_vcpus: Vec<usize> = match input.below(5) {
        0 => (0..count).collect(),
        k => (0..count).map(|t| t % usize::from(k)).collect(),
    };
    let inner = Arc::new(Inner::default());
    let monitor = WorkloadMonitor::with_vcpus(task_vcpus.clone(), inner.clone());
    let mut model = vec![Model::default(); count];
    let mut inner_calls = 0u64;

    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        match input.u8() % 8 {
            0..=2 => {
                let task = usize::from(input.below(MAX_TASKS as u8 + 2)) % MAX_TASKS;
                let vcpu = vcpu(&mut input);
                let value = input.array::<4>();
                let got = monitor.mmio_write(vcpu, doorbell_gpa(task), &value);
                let want = model_event(
                    &mut model,
                    &task_vcpus,
                    vcpu,
                    task,
                    u32::from_le_bytes(value),
                );
                assert_eq!(got, want, "task {task} vCPU {vcpu} value {value:x?}");
            }
            3 => {
                let vcpu = vcpu(&mut input);
                let addr = match input.below(4) {
                    0 => DOORBELL_GPA,
                    1 => DOORBELL_GPA
                        .wrapping_add(u64::from(input.u8()))
                        .wrapping_sub(128),
                    _ => input.u64(),
                };
                let len = usize::from(input.below(16));
                let data = input.take(len);
                let got = monitor.mmio_write(vcpu, addr, data);
                if let (Some(task), [a, b, c, d]) = (doorbell_task(addr), data) {
                    let value = u32::from_le_bytes([*a, *b, *c, *d]);
                    assert_eq!(got, model_event(&mut model, &task_vcpus, vcpu, task, value));
                } else {
                    inner_calls += 1;
                    assert_eq!(got, VcpuAction::Continue);
                }
            }
            4 => check_progress(&monitor, &model),
            5 => {
                let vcpu = vcpu(&mut input);
                let mut buf = [0u8; 8];
                let len = usize::from(input.below(9));
                let actions = [
                    monitor.io_in(vcpu, input.u16(), &mut buf[..len]),
                    monitor.io_out(vcpu, input.u16(), &buf[..len]),
                    monitor.mmio_read(vcpu, DOORBELL_GPA, &mut buf[..len]),
                ];
                inner_calls += 3;
                assert!(actions.iter().all(|a| *a == VcpuAction::Continue));
            }
            6 => {
                let value = input.u32();
                if let Some(event) = Event::decode(value) {
                    // `Started` carries no argument, so its argument bits are dropped.
                    let kept = if event == Event::Started {
                        value & 0xff00_0000
                    } else {
                        value
                    };
                    assert_eq!(event.encode(), kept, "{event:?}");
                    assert_eq!(Event::decode(kept), Some(event));
                } else {
                    assert!(
                        !(1..=4).contains(&(value >> 24)),
                        "{value:#x} should decode"
                    );
                }
            }
            _ => check_validate(&mut input),
        }
        assert_eq!(inner.calls.load(Ordering::Relaxed), inner_calls);
    }
    check_progress(&monitor, &model);
});
