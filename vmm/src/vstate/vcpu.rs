//! The vCPU run loop: one thread per vCPU, exits dispatched to an [`ExitHandler`], the VM's end
//! decided once through [`VmControl`].
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_ioctls::{VcpuExit, VcpuFd};
use mirrorball_profiler::exits::ExitKind;
use mirrorball_profiler::kvm_stats::StatsFd;
use mirrorball_profiler::vcpu_accounting::{StoppedAt, VcpuAccounting, VcpuReport};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::paging;
use crate::exit::VmEnd;
use crate::vstate::first_slice::{FirstSlice, StartGate};
use crate::vstate::halt::{HaltWatch, VcpuRest};
use crate::vstate::vcpu_thread::VcpuThread;

/// What the run loop does after an exit.
#[derive(Debug, PartialEq)]
pub enum VcpuAction {
    /// Re-enter the guest.
    Continue,
    /// Stop this vCPU; the VM goes on.
    StopVcpu,
    /// End the whole VM.
    StopVm(VmEnd),
}

/// Handles the exits that need the VMM's devices. Shared by all vCPU threads.
pub trait ExitHandler: Send + Sync {
    /// `in` from `port`: fill `data`.
    fn io_in(&self, vcpu: usize, port: u16, data: &mut [u8]) -> VcpuAction;
    /// `out` of `data` to `port`.
    fn io_out(&self, vcpu: usize, port: u16, data: &[u8]) -> VcpuAction;
    /// MMIO read at `addr`: fill `data`.
    fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> VcpuAction;
    /// MMIO write of `data` at `addr`.
    fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) -> VcpuAction;
}

/// Shared between the vCPU threads and the thread that waits for the VM to end.
#[derive(Debug)]
pub struct VmControl {
    end: Mutex<Option<VmEnd>>,
    stop: AtomicBool,
    running: AtomicUsize,
    wake: EventFd,
    halt: HaltWatch,
    pause: PauseGate,
    /// Shared with the VMs launched together: the vCPUs wait there before their first run.
    start_gate: std::sync::OnceLock<Arc<StartGate>>,
}

/// Pausing: the controller raises `requested`, kicks the vCPU threads out of KVM_RUN, and each
/// thread parks on `resumed` (counted in `parked`) until the request is lowered or the VM ends.
/// While parked, a vCPU thread runs the jobs queued for it (e.g. saving its state).
#[derive(Debug, Default)]
struct PauseGate {
    requested: AtomicBool,
    parked: Mutex<ParkState>,
    changed: Condvar,
}

#[derive(Default)]
struct ParkState {
    parked: usize,
    jobs: Vec<Option<VcpuJob>>,
}

impl std::fmt::Debug for ParkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkState")
            .field("parked", &self.parked)
            .field("jobs", &self.jobs.iter().filter(|j| j.is_some()).count())
            .finish()
    }
}

/// Work a parked vCPU thread does on its own vCPU fd, handing the result back.
pub type VcpuJob = Box<dyn FnOnce(&VcpuFd) + Send>;

impl VmControl {
    /// A control block for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> std::io::Result<Self> {
        Ok(Self {
            end: Mutex::new(None),
            stop: AtomicBool::new(false),
            running: AtomicUsize::new(vcpus),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            halt: HaltWatch::new(vcpus),
            pause: PauseGate {
                parked: Mutex::new(ParkState {
                    parked: 0,
                    jobs: (0..vcpus).map(|_| None).collect(),
                }),
                ..PauseGate::default()
            },
            start_gate: std::sync::OnceLock::new(),
        })
    }

    /// Makes the vCPUs wait at `gate` before their first run (set before they start; a
    /// second gate is ignored).
    pub fn set_start_gate(&self, gate: Arc<StartGate>) {
        let _ = self.start_gate.set(gate);
    }

    /// Asks every vCPU to park at its next exit (the caller kicks them out of KVM_RUN).
    pub fn request_pause(&self) {
        self.pause.requested.store(true, Ordering::SeqCst);
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let _guard = self.pause.parked.lock().unwrap_or_else(|p| p.into_inner());
        self.pause.requested.store(false, Ordering::SeqCst);
        self.pause.changed.notify_all();
    }

    /// Whether a pause was requested (and not yet lifted).
    pub fn pause_requested(&self) -> bool {
        self.pause.requested.load(Ordering::SeqCst)
    }

    /// Whether every vCPU still running is parked (the VM is fully paused).
    pub fn all_parked(&self) -> bool {
        let state = self.pause.parked.lock().unwrap_or_else(|p| p.into_inner());
        self.pause_requested() && state.parked >= self.running.load(Ordering::SeqCst)
    }

    /// vCPU threads that have not stopped.
    pub fn running_vcpus(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Queues `job` for parked vCPU `index` (replacing one not yet run); false if out of range.
    pub fn queue_job(&self, index: usize, job: VcpuJob) -> bool {
        let mut state = self.pause.parked.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = state.jobs.get_mut(index) else {
            return false;
        };
        *slot = Some(job);
        self.pause.changed.notify_all();
        true
    }

    /// Parks the calling vCPU thread while a pause is requested and the VM goes on, running the
    /// jobs queued for it.
    fn park(&self, index: usize, fd: &VcpuFd) {
        let mut state = self.pause.parked.lock().unwrap_or_else(|p| p.into_inner());
        state.parked += 1;
        loop {
            if let Some(job) = state.jobs.get_mut(index).and_then(Option::take) {
                drop(state);
                job(fd);
                state = self.pause.parked.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if !self.pause_requested() || self.should_stop() {
                break;
            }
            state = self
                .pause
                .changed
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
    }

    /// Records why the VM ends (the first reason wins) and tells everyone to stop.
    pub fn end(&self, reason: VmEnd) {
        {
            let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
            if end.is_none() {
                *end = Some(reason);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        {
            // Parked vCPUs wake up to leave.
            let _guard = self.pause.parked.lock().unwrap_or_else(|p| p.into_inner());
            self.pause.changed.notify_all();
        }
        if let Some(gate) = self.start_gate.get() {
            gate.wake();
        }
        // A full eventfd counter only means a wake-up is already pending.
        let _ = self.wake.write(1);
    }

    /// Whether the VM is ending.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The reason the VM ended, once it has.
    pub fn reason(&self) -> Option<VmEnd> {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Readable when the VM ends.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Whether the vCPUs halted for good (see [`crate::vstate::halt`]).
    pub fn halt_watch(&self) -> &HaltWatch {
        &self.halt
    }

    fn vcpu_stopped(&self) {
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.end(VmEnd::AllVcpusStopped);
        }
    }
}

/// One vCPU, ready to run on its own thread.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    handler: Arc<dyn ExitHandler>,
    control: Arc<VmControl>,
    memory: GuestMemoryMmap,
    thread: Arc<VcpuThread>,
    on_start: Option<Box<dyn FnOnce() + Send>>,
    on_stop: Option<Box<dyn FnOnce() + Send>>,
    /// Faults the VMM's pager resolves for this thread (added to its host faults).
    pager_faults: Option<crate::profiling::sampler::ThreadFaultSource>,
    /// Since when KVM_RUN has failed with EFAULT without a success (see [`EFAULT_RETRY_FOR`]).
    efault_since: Option<std::time::Instant>,
    /// The last exit was port I/O or MMIO: KVM finishes that instruction (stores an `in`'s
    /// data, advances RIP) only at the next KVM_RUN.
    exit_incomplete: bool,
    /// Cut the first KVM_RUN short after this long and yield (see [`super::first_slice`]).
    first_slice: Option<std::time::Duration>,
}

/// How long KVM_RUN EFAULTs in a row are retried (1 ms apart) before the VM fails. Under a
/// memory cgroup limit (`crate::budget`) the host's reclaim can fall behind a thrashing guest:
/// KVM's fault-in of a guest page then fails with EFAULT once and succeeds a moment later.
pub const EFAULT_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// The `immediate_exit` byte of the vCPU this thread runs (null elsewhere). The kick handler
    /// sets it, so a kick that lands just before KVM_RUN makes KVM_RUN return at once (EINTR)
    /// instead of being lost.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread-local without destructor: a plain TLS read, safe here.
    let _ = IMMEDIATE_EXIT.try_with(|byte| {
        let byte = byte.get();
        if !byte.is_null() {
            // SAFETY: the vCPU thread points this at its own live `kvm_run` mapping and clears
            // it before the mapping goes; the handler runs on that thread.
            unsafe { std::ptr::write_volatile(byte, 1) };
        }
    });
}

/// Installs the (empty) kick handler; KVM_RUN then returns EINTR when the signal arrives.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(
        index: usize,
        fd: VcpuFd,
        handler: Arc<dyn ExitHandler>,
        control: Arc<VmControl>,
        memory: GuestMemoryMmap,
    ) -> Self {
        Self {
            index,
            fd,
            handler,
            control,
            memory,
            thread: Arc::new(VcpuThread::default()),
            on_start: None,
            on_stop: None,
            pager_faults: None,
            efault_since: None,
            exit_incomplete: false,
            first_slice: None,
        }
    }

    /// Cuts the first KVM_RUN short after `slice` and yields the CPU once then: for vCPUs let
    /// go together with more of them than CPUs ([`super::first_slice`]).
    pub fn set_first_slice(&mut self, slice: std::time::Duration) {
        self.first_slice = Some(slice);
    }

    /// Runs `hook` on the vCPU thread before its first KVM_RUN (e.g. to take baselines).
    pub fn set_on_start(&mut self, hook: Box<dyn FnOnce() + Send>) {
        self.on_start = Some(hook);
    }

    /// Adds the faults `source` resolves for the vCPU thread to its host faults in the report.
    pub fn add_fault_source(&mut self, source: crate::profiling::sampler::ThreadFaultSource) {
        self.pager_faults = Some(source);
    }

    /// Runs `hook` on the vCPU thread after its last KVM_RUN, before it reports itself stopped
    /// (e.g. to publish final counters).
    pub fn set_on_stop(&mut self, hook: Box<dyn FnOnce() + Send>) {
        self.on_stop = Some(hook);
    }

    /// The vCPU file descriptor (for stats and TSC queries before the vCPU runs).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Where the vCPU thread publishes its thread id (when it starts) and its run epoch.
    pub fn thread_handle(&self) -> Arc<VcpuThread> {
        self.thread.clone()
    }

    /// Runs until the vCPU or the VM stops; returns the vCPU's accounting.
    pub fn run(mut self) -> VcpuReport {
        let stats = StatsFd::for_vcpu(&self.fd).ok();
        let mut acct = match VcpuAccounting::new(self.index, stats) {
            Ok(acct) => acct,
            Err(e) => {
                let msg = format!("cannot start accounting for vCPU {}: {e}", self.index);
                self.control.end(VmEnd::VmmError(msg));
                self.control.vcpu_stopped();
                return VcpuReport::default();
            }
        };
        if let Some(hook) = self.on_start.take() {
            hook();
        }
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.thread.set_tid(tid);
        let pager_before = self.pager_faults.as_ref().map(|f| f(tid));
        if let Some(gate) = self.control.start_gate.get() {
            gate.wait(|| self.control.should_stop());
        }
        let immediate_exit = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|byte| byte.set(immediate_exit));
        loop {
            // Before the checks: a kick from here on makes the next KVM_RUN return at once, and
            // one before was sent after what it signals (a stop, a pause) was set.
            self.fd.set_kvm_immediate_exit(0);
            if self.control.should_stop() {
                break;
            }
            if self.control.pause_requested() {
                self.complete_exit();
                self.control.park(self.index, &self.fd);
                continue;
            }
            let first_slice = self
                .first_slice
                .take()
                .and_then(|slice| FirstSlice::arm(tid, slice).ok());
            acct.enter_run();
            let (kind, action) = self.run_once();
            acct.exit_run(kind);
            if let Some(slice) = first_slice {
                slice.end();
            }
            self.exit_incomplete = matches!(
                kind,
                ExitKind::IoIn | ExitKind::IoOut | ExitKind::MmioRead | ExitKind::MmioWrite
            );
            if kind == ExitKind::Intr {
                self.record_rest();
            }
            match action {
                VcpuAction::Continue => {}
                VcpuAction::StopVcpu => break,
                VcpuAction::StopVm(reason) => {
                    self.control.end(reason);
                    break;
                }
            }
        }
        IMMEDIATE_EXIT.with(|byte| byte.set(std::ptr::null_mut()));
        if let Some(hook) = self.on_stop.take() {
            hook();
        }
        self.control.vcpu_stopped();
        let mut report = acct.finish();
        if let (Some(source), Some((min0, maj0))) = (&self.pager_faults, pager_before) {
            let (min, maj) = source(tid);
            report.host_minor_faults += min.saturating_sub(min0);
            report.host_major_faults += maj.saturating_sub(maj0);
        }
        report.stopped_at = self.stopped_at();
        report
    }

    /// Lets KVM finish the instruction of the last I/O exit without running the guest on
    /// (`immediate_exit`: KVM_RUN completes it, then returns EINTR), so that the state a parked
    /// vCPU shows (a snapshot) is consistent: the instruction done, its result in place.
    fn complete_exit(&mut self) {
        if !std::mem::take(&mut self.exit_incomplete) {
            return;
        }
        self.fd.set_kvm_immediate_exit(1);
        // EINTR is the expected answer; anything else shows up at the next real KVM_RUN.
        let fd = &mut self.fd;
        let _ = self.thread.in_kvm_run(|| fd.run().map(|_| ()));
        self.fd.set_kvm_immediate_exit(0);
    }

    fn stopped_at(&self) -> Option<StoppedAt> {
        let regs = self.fd.get_regs().ok()?;
        let mp = self.fd.get_mp_state().ok()?;
        Some(StoppedAt {
            rip: regs.rip,
            rflags: regs.rflags,
            mp_state: mp.mp_state,
        })
    }

    fn run_once(&mut self) -> (ExitKind, VcpuAction) {
        let i = self.index;
        let h = &self.handler;
        let fd = &mut self.fd;
        let result = self.thread.in_kvm_run(|| fd.run());
        match &result {
            Err(e)
                if e.errno() == libc::EFAULT
                    && self
                        .efault_since
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed()
                        < EFAULT_RETRY_FOR =>
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
                return (ExitKind::Other, VcpuAction::Continue);
            }
            Err(_) => {}
            Ok(_) => self.efault_since = None,
        }
        match result {
            Ok(VcpuExit::IoIn(port, data)) => (ExitKind::IoIn, h.io_in(i, port, data)),
            Ok(VcpuExit::IoOut(port, data)) => (ExitKind::IoOut, h.io_out(i, port, data)),
            Ok(VcpuExit::MmioRead(addr, data)) => (ExitKind::MmioRead, h.mmio_read(i, addr, data)),
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                (ExitKind::MmioWrite, h.mmio_write(i, addr, data))
            }
            Ok(VcpuExit::Hlt) => (ExitKind::Hlt, VcpuAction::StopVcpu),
            Ok(VcpuExit::Shutdown) => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                let end = VmEnd::TripleFault { vcpu: i, rip };
                (ExitKind::Shutdown, VcpuAction::StopVm(end))
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                let end = VmEnd::FailEntry { vcpu: i, reason };
                (ExitKind::FailEntry, VcpuAction::StopVm(end))
            }
            Ok(VcpuExit::InternalError) => (
                ExitKind::InternalError,
                VcpuAction::StopVm(self.internal_error()),
            ),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let end = if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    VmEnd::GuestReset
                } else {
                    VmEnd::GuestShutdown
                };
                (ExitKind::SystemEvent, VcpuAction::StopVm(end))
            }
            Ok(VcpuExit::Intr) => (ExitKind::Intr, VcpuAction::Continue),
            Ok(_) => (ExitKind::Other, VcpuAction::Continue),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                (ExitKind::Intr, VcpuAction::Continue)
            }
            Err(e) => {
                let end = VmEnd::VmmError(format!("KVM_RUN failed on vCPU {i}: {e}"));
                (ExitKind::Other, VcpuAction::StopVm(end))
            }
        }
    }

    /// After a kick: tells the halt watch whether this vCPU rests for good.
    fn record_rest(&self) {
        let rest = match (self.fd.get_mp_state(), self.fd.get_regs()) {
            (Ok(mp), Ok(regs)) => VcpuRest::classify(mp.mp_state, regs.rflags),
            _ => VcpuRest::Unknown,
        };
        self.control.halt.record(self.index, rest);
    }

    fn internal_error(&mut self) -> VmEnd {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data = internal.data[..n].to_vec();
        let (rip, code) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => (regs.rip, self.code_at(sregs.cr3, regs.rip)),
            _ => (0, Vec::new()),
        };
        VmEnd::InternalError {
            vcpu: self.index,
            suberror: internal.suberror,
            rip,
            code,
            data,
        }
    }

    fn code_at(&self, cr3: u64, rip: u64) -> Vec<u8> {
        let mut code = [0u8; 16];
        match paging::translate(&self.memory, cr3, rip) {
            Some(gpa) if self.memory.read_slice(&mut code, GuestAddress(gpa)).is_ok() => {
                code.to_vec()
            }
            _ => Vec::new(),
        }
    }
}
