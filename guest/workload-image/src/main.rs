//! Bare-metal image of the OS-less workload guest.
//!
//! The VMM enters [`_start`] in user mode on every vCPU (see `mirrorball_workload` for the
//! contract). Each vCPU runs the `work` program over its own region and rings the doorbell after
//! every iteration. There is no kernel, no interrupt and no page fault of the guest's own: each
//! task counts the first touch of every page of its region in a bitmap the VMM reserved for it
//! ([`PageTracker`]), the demand-zero faults its own OS would take, as its guest minor faults.
#![no_std]
#![no_main]

mod mem;
mod profile;

use core::panic::PanicInfo;
use mirrorball_workload::{
    bad_params, doorbell_gpa, run_iteration, run_iteration_tracked, validate, AccessStream, Event,
    PageTracker, Params, Pattern, TaskParams, MAX_TASKS, MAX_TASKS_PER_VCPU, TASK_READ_ONLY,
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
    /// Pages of the region touched so far (none without a bitmap).
    pages: Option<PageTracker<'static>>,
    profile: Option<profile::Profile>,
}

impl Running {
    /// Guest minor faults so far: first touches of the region's pages.
    fn min_flt(&self) -> u64 {
        self.pages.as_ref().map_or(0, PageTracker::touched)
    }
}

/// The page tracker of task `t`, over the bitmap the VMM reserved for it (`validate` checked
/// that it is large enough, does not wrap and lies outside the region).
fn tracker(t: &TaskParams) -> Option<PageTracker<'static>> {
    if t.bitmap_gpa == 0 {
        return None;
    }
    let len = usize::try_from(t.bitmap_bytes).ok()?;
    // SAFETY: the VMM reserved `bitmap_bytes` of identity-mapped RAM at `bitmap_gpa` for this
    // task alone, outside every task region, for the guest's whole life; the address is non-null
    // and any address is aligned for bytes.
    let bits = unsafe { core::slice::from_raw_parts_mut(t.bitmap_gpa as *mut u8, len) };
    PageTracker::new(bits, t.region_bytes).ok()
}

/// Entry point on every vCPU: `vcpu` is the vCPU index, `params` the VMM's parameter block.
///
/// # Safety
/// Called only by the VMM's initial register state, with `params` pointing at a [`Params`] block
/// and task regions and page bitmaps identity-mapped and owned by their task alone.
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
        let comm: &[u8] = match (pattern, t.flags & TASK_READ_ONLY != 0) {
            (Pattern::Random, false) => b"work-R",
            (Pattern::Locality, false) => b"work-L",
            (Pattern::Random, true) => b"read-R",
            (Pattern::Locality, true) => b"read-L",
        };
        let pages = tracker(&t);
        if t.bitmap_gpa != 0 && pages.is_none() {
            ring(index, Event::BadParams(bad_params::TASK));
            idle();
        }
        *slot = Some(Running {
            index,
            params: t,
            stream: AccessStream::new(pattern, t.region_bytes, t.seed)
                .with_writes(t.flags & TASK_READ_ONLY == 0),
            done: 0,
            checksum: 0,
            pages,
            profile: u32::try_from(index)
                .ok()
                .zip(u32::try_from(vcpu).ok())
                .and_then(|(index, vcpu)| profile::Profile::register(&params, index, vcpu, comm)),
        });
        // A first sample at zero: the baseline every later (absolute) sample is measured
        // against, as a Linux guest's driver samples a task from its registration on.
        if let Some(Some(p)) = slot.as_ref().map(|r| r.profile.as_ref()) {
            p.sample(false, 0);
        }
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
            let (region, len, accesses) = (
                t.region_gpa as *mut u8,
                t.region_bytes,
                t.accesses_per_iteration,
            );
            // SAFETY: the VMM gave this task `region_bytes` of identity-mapped memory of its own,
            // disjoint from its bitmap.
            let sum = unsafe {
                match &mut task.pages {
                    Some(pages) => {
                        run_iteration_tracked(region, len, &mut task.stream, accesses, pages)
                    }
                    None => run_iteration(region, len, &mut task.stream, accesses),
                }
            };
            task.checksum = task.checksum.wrapping_add(sum);
            task.done += 1;
            let min_flt = task.min_flt();
            if let Some(p) = &mut task.profile {
                p.checkpoint();
                p.sample(false, min_flt);
            }
            // The end of the turn: announces the switch to the VMM (an exit).
            ring(task.index, Event::IterationDone(task.done));
            if let Some(p) = &mut task.profile {
                p.checkpoint();
            }
            if task.done == task.params.iterations {
                if let Some(p) = &task.profile {
                    p.finish(min_flt);
                }
                ring(
                    task.index,
                    Event::Finished((task.checksum & 0xffff_ffff) as u32),
                );
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
