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
    run_iteration, validate, AccessStream, Event, Params, Pattern, DOORBELL_GPA,
};

fn ring(event: Event) {
    // SAFETY: the doorbell address is identity-mapped by the VMM and backed by no memory: the
    // store exits to the VMM and touches nothing in the guest.
    unsafe { core::ptr::write_volatile(DOORBELL_GPA as *mut u32, event.encode()) }
}

fn idle() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Entry point on every vCPU: `task` is the vCPU index, `params` the VMM's parameter block.
///
/// # Safety
/// Called only by the VMM's initial register state, with `params` pointing at a [`Params`] block
/// and task regions identity-mapped and owned by this task alone.
#[no_mangle]
#[link_section = ".text.entry"]
pub unsafe extern "C" fn _start(task: u64, params: *const Params) -> ! {
    // SAFETY: the VMM wrote a `Params` block at this address before starting the vCPU.
    let params = unsafe { core::ptr::read_volatile(params) };
    let t = match validate(&params, task as usize) {
        Ok(t) => t,
        Err(code) => {
            ring(Event::BadParams(code));
            idle();
        }
    };
    let pattern = Pattern::from_raw(t.pattern).unwrap_or(Pattern::Random);
    let mut stream = AccessStream::new(pattern, t.region_bytes, t.seed);
    let region = t.region_gpa as *mut u8;
    let mut checksum = 0u64;
    let comm: &[u8] = if pattern == Pattern::Random {
        b"work-R"
    } else {
        b"work-L"
    };
    let profile = profile::Profile::start(&params, task as u32, comm);
    ring(Event::Started);
    for iteration in 1..=t.iterations {
        // SAFETY: the VMM gave this task `region_bytes` of identity-mapped memory of its own.
        checksum = checksum.wrapping_add(unsafe {
            run_iteration(
                region,
                t.region_bytes,
                &mut stream,
                t.accesses_per_iteration,
            )
        });
        if let Some(p) = &profile {
            p.sample(false);
        }
        ring(Event::IterationDone(iteration));
    }
    if let Some(p) = &profile {
        p.finish();
    }
    ring(Event::Finished(checksum as u32));
    idle()
}

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    ring(Event::BadParams(0xff_ffff));
    idle()
}

/// The prebuilt `core` refers to this symbol from unwind tables; the image never unwinds
/// (panic = "abort"), so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
