//! Detects a VM that stopped for good without telling the VMM: every vCPU halted with
//! interrupts off (`cli; hlt`, what Linux does to halt or power off without ACPI), or still
//! waiting for a startup IPI that no running vCPU is left to send.
//!
//! With KVM's in-kernel irqchip a `hlt` never reaches user space: the vCPU thread sleeps inside
//! `KVM_RUN`. So the VMM kicks the vCPU threads now and then ([`HaltWatch`] rounds, driven by
//! the runner); each thread, back from `KVM_RUN` with `EINTR`, records its [`VcpuRest`] from
//! `KVM_GET_MP_STATE` and RFLAGS. When in one round every vCPU rests for good and at least one
//! is halted, the VM has ended. Only an NMI, INIT or SMI could wake such a vCPU, and nothing
//! in the VM is left running to send one.
use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED};

/// RFLAGS.IF: maskable interrupts enabled.
const RFLAGS_IF: u64 = 1 << 9;

/// What a vCPU was doing when it was last checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuRest {
    /// Not checked in this round, or running.
    Unknown = 0,
    /// Halted with interrupts off.
    HaltedForGood = 1,
    /// An application processor still waiting for INIT/SIPI.
    WaitingForStartup = 2,
}

impl VcpuRest {
    /// Classifies a vCPU from its `KVM_GET_MP_STATE` value and RFLAGS.
    pub fn classify(mp_state: u32, rflags: u64) -> Self {
        match mp_state {
            KVM_MP_STATE_HALTED if rflags & RFLAGS_IF == 0 => Self::HaltedForGood,
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => Self::WaitingForStartup,
            _ => Self::Unknown,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::HaltedForGood,
            2 => Self::WaitingForStartup,
            _ => Self::Unknown,
        }
    }
}

/// Per-vCPU rest states of one VM, for one check round at a time.
#[derive(Debug)]
pub struct HaltWatch {
    rest: Vec<AtomicU8>,
}

impl HaltWatch {
    /// A watch over `vcpus` vCPUs, all unknown.
    pub fn new(vcpus: usize) -> Self {
        Self {
            rest: (0..vcpus).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// Records what vCPU `index` is doing (ignored for an index out of range).
    pub fn record(&self, index: usize, rest: VcpuRest) {
        if let Some(r) = self.rest.get(index) {
            r.store(rest as u8, Ordering::SeqCst);
        }
    }

    /// Whether, in the round that is ending, every vCPU rested for good and one was halted.
    pub fn stopped_for_good(&self) -> bool {
        let states: Vec<VcpuRest> = self
            .rest
            .iter()
            .map(|r| VcpuRest::from_u8(r.load(Ordering::SeqCst)))
            .collect();
        !states.is_empty()
            && states.iter().all(|s| *s != VcpuRest::Unknown)
            && states.contains(&VcpuRest::HaltedForGood)
    }

    /// Starts a new round: every vCPU unknown until it is checked again.
    pub fn new_round(&self) {
        for r in &self.rest {
            r.store(VcpuRest::Unknown as u8, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_halted_with_interrupts_off_is_for_good() {
        assert_eq!(
            VcpuRest::classify(KVM_MP_STATE_HALTED, 0x2),
            VcpuRest::HaltedForGood
        );
        assert_eq!(
            VcpuRest::classify(KVM_MP_STATE_HALTED, 0x202),
            VcpuRest::Unknown
        );
        assert_eq!(
            VcpuRest::classify(kvm_bindings::KVM_MP_STATE_RUNNABLE, 0x2),
            VcpuRest::Unknown
        );
        assert_eq!(
            VcpuRest::classify(KVM_MP_STATE_INIT_RECEIVED, 0x202),
            VcpuRest::WaitingForStartup
        );
    }

    #[test]
    fn a_vm_stops_when_all_rest_and_one_halted() {
        let w = HaltWatch::new(2);
        assert!(!w.stopped_for_good());
        w.record(0, VcpuRest::HaltedForGood);
        assert!(!w.stopped_for_good(), "vCPU 1 unknown");
        w.record(1, VcpuRest::WaitingForStartup);
        assert!(w.stopped_for_good());
        w.new_round();
        assert!(!w.stopped_for_good(), "a new round forgets");
        w.record(0, VcpuRest::WaitingForStartup);
        w.record(1, VcpuRest::WaitingForStartup);
        assert!(!w.stopped_for_good(), "nobody halted: the VM never started");
        w.record(7, VcpuRest::HaltedForGood); // out of range: ignored
        assert!(HaltWatch::new(0).rest.is_empty() && !HaltWatch::new(0).stopped_for_good());
    }
}
