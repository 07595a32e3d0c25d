//! Bare-metal image of the OS-less workload guest.
//!
//! The VMM enters [`_start`] in user mode on every vCPU (see `mirrorball_workload` for the
//! contract). Each vCPU runs the `work` program over its own region and rings the doorbell after
//! every iteration. There is no kernel, no interrupt and no page fault of the guest's own.
#![no_std]
#![no_main]

mod mem;
mod profile;

use core::panic::PanicInfo;
use mirrorball_workload::{
    bad_params, doorbell_gpa, run_iteration, validate, AccessStream, Event, Params, Pattern,
    TaskParams, MAX_TASKS, MAX_TASKS_PER_VCPU,
};

fn ring(task: usize, event: Event) {
    // SAFETY: the doorbell addresses are identity-mapped by the VMM and backed by no memory: the
    // store exits to the VMM and touches nothing in the guest.
    unsafe { core::ptr::write_volatile(doorbell_gpa(task) as *mut u32, event.encode()) }
}

fn idle() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// One of this vCPU's tasks.
struct Running {
    index: usize,
    params: TaskParams,
    stream: AccessStream,
    done: u32,
    checksum: u64,
    profile: Option<profile::Profile>,
}

/// Entry point on every vCPU: `vcpu` is the vCPU index, `params` the VMM's parameter block.
///
/// # Safety
/// Called only by the VMM's initial register state, with `params` pointing at a [`Params`] block
/// and task regions identity-mapped and owned by their task alone.
#[no_mangle]
#[link_section = ".text.entry"]
pub unsafe extern "C" fn _start(vcpu: u64, params: *const Params) -> ! {
    // SAFETY: the VMM wrote a `Params` block at this address before starting the vCPU.
    let params = unsafe { core::ptr::read_volatile(params) };
    let mut mine: [Option<Running>; MAX_TASKS_PER_VCPU] = [const { None }; MAX_TASKS_PER_VCPU];
    let mut count = 0;
    for index in 0..(params.task_count as usize).min(MAX_TASKS) {
        let t = match validate(&params, index) {
            Ok(t) => t,
            Err(code) => {
                ring(index, Event::BadParams(code));
                idle();
            }
        };
        if u64::from(t.vcpu) != vcpu {
            continue;
        }
        let Some(slot) = mine.get_mut(count) else {
            ring(index, Event::BadParams(bad_params::TASK_INDEX));
            idle();
        };
        let pattern = Pattern::from_raw(t.pattern).unwrap_or(Pattern::Random);
        let comm: &[u8] = if pattern == Pattern::Random {
            b"work-R"
        } else {
            b"work-L"
        };
        *slot = Some(Running {
            index,
            params: t,
            stream: AccessStream::new(pattern, t.region_bytes, t.seed),
            done: 0,
            checksum: 0,
            profile: profile::Profile::register(&params, index as u32, vcpu as u32, comm),
        });
        count += 1;
        ring(index, Event::Started);
    }
    // Round robin, one iteration per turn: every turn is a context switch on this vCPU.
    let mut remaining = count;
    while remaining > 0 {
        for task in mine.iter_mut().flatten() {
            if task.done == task.params.iterations {
                continue;
            }
            if let Some(p) = &mut task.profile {
                p.switch_in();
            }
            let t = &task.params;
            // SAFETY: the VMM gave this task `region_bytes` of identity-mapped memory of its own.
            task.checksum = task.checksum.wrapping_add(unsafe {
                run_iteration(
                    t.region_gpa as *mut u8,
                    t.region_bytes,
                    &mut task.stream,
                    t.accesses_per_iteration,
                )
            });
            task.done += 1;
            if let Some(p) = &mut task.profile {
                p.switch_out();
                p.sample(false);
            }
            ring(task.index, Event::IterationDone(task.done));
            if task.done == task.params.iterations {
                if let Some(p) = &task.profile {
                    p.finish();
                }
                ring(task.index, Event::Finished(task.checksum as u32));
                remaining -= 1;
            }
        }
    }
    if let Some(p) = mine.iter().flatten().find_map(|t| t.profile.as_ref()) {
        p.idle();
    }
    idle()
}

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    ring(0, Event::BadParams(0xff_ffff));
    idle()
}

/// The prebuilt `core` refers to this symbol from unwind tables; the image never unwinds
/// (panic = "abort"), so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
