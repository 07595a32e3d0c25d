//! Why a VM ended, as one line for the user and a documented process exit code.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | the guest reset, powered off or halted for good, its vCPUs all stopped, or the workload finished |
//! | 1 | VMM error (bad input, setup failure, KVM_RUN failure) |
//! | 2 | command-line usage error |
//! | 3 | triple fault (KVM_EXIT_SHUTDOWN) |
//! | 4 | KVM internal error (e.g. emulation failure) |
//! | 5 | KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY) |
//! | 6 | the workload guest rejected its parameters |
//! | 7 | `--timeout` expired |
//! | 13 | `--machine-mem`: the budget cannot be set up (too small, no root, no memory controller, no swap space; `--pager uffd`: no userfaultfd, template clones, `--ksm`, a swap file that exists) |
//! | 14 | `--machine-mem`: the budget ran out while the VMs ran (swap full or memory not reclaimable) |
//! | 20 | `vmm ctl`: no running VM has that name (or id) |
//! | 21 | `vmm ctl`: the VM refused the request (one-line error; the VM is untouched) |
//! | 22 | `vmm --restore`: the snapshot was refused (missing, truncated, corrupted, wrong version, or taken on a host whose KVM or CPU differs) |
//! | 130 | interrupted by SIGINT/SIGTERM |
//!
//! A VM stopped through its control socket (`vmm ctl NAME stop`) ends with code 0.
use std::fmt;

/// Exit code of a VMM error.
pub const EXIT_VMM_ERROR: i32 = 1;

/// The reason a VM ended.
#[derive(Clone, Debug, PartialEq)]
pub enum VmEnd {
    /// The guest asked for a reset (i8042 pulse or KVM system event).
    GuestReset,
    /// The guest powered off (KVM system event).
    GuestShutdown,
    /// Every vCPU stopped on its own (e.g. `hlt` without an in-kernel irqchip).
    AllVcpusStopped,
    /// Every vCPU halted with interrupts off (or never started): how Linux halts or powers
    /// off a machine without ACPI.
    GuestHalted,
    /// Every task of the OS-less workload finished.
    WorkloadFinished,
    /// A workload task rejected its parameters.
    WorkloadBadParams {
        /// vCPU of the task.
        vcpu: usize,
        /// Code from `mirrorball_workload::bad_params`.
        code: u32,
    },
    /// The guest triple-faulted.
    TripleFault {
        /// vCPU that faulted.
        vcpu: usize,
        /// Its instruction pointer.
        rip: u64,
    },
    /// KVM reported an internal error.
    InternalError {
        /// vCPU.
        vcpu: usize,
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
        /// Guest instruction pointer.
        rip: u64,
        /// Up to 16 bytes of guest code at `rip`, when they could be read.
        code: Vec<u8>,
        /// `kvm_run.internal.data[..ndata]`.
        data: Vec<u64>,
    },
    /// KVM could not enter the guest.
    FailEntry {
        /// vCPU.
        vcpu: usize,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// `--timeout` expired.
    Timeout {
        /// The limit in seconds.
        seconds: f64,
    },
    /// A signal asked the VMM to stop.
    Interrupted,
    /// A controller stopped the VM through its control socket.
    Stopped,
    /// The VMM itself failed while the VM ran.
    VmmError(String),
}

impl VmEnd {
    /// The process exit code for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::GuestReset
            | Self::GuestShutdown
            | Self::AllVcpusStopped
            | Self::GuestHalted
            | Self::WorkloadFinished
            | Self::Stopped => 0,
            Self::VmmError(_) => EXIT_VMM_ERROR,
            Self::TripleFault { .. } => 3,
            Self::InternalError { .. } => 4,
            Self::FailEntry { .. } => 5,
            Self::WorkloadBadParams { .. } => 6,
            Self::Timeout { .. } => 7,
            Self::Interrupted => 130,
        }
    }

    /// A short stable name, for the stats file.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::GuestReset => "guest_reset",
            Self::GuestShutdown => "guest_shutdown",
            Self::AllVcpusStopped => "all_vcpus_stopped",
            Self::GuestHalted => "guest_halted",
            Self::WorkloadFinished => "workload_finished",
            Self::WorkloadBadParams { .. } => "workload_bad_params",
            Self::TripleFault { .. } => "triple_fault",
            Self::InternalError { .. } => "kvm_internal_error",
            Self::FailEntry { .. } => "kvm_fail_entry",
            Self::Timeout { .. } => "timeout",
            Self::Interrupted => "interrupted",
            Self::Stopped => "stopped",
            Self::VmmError(_) => "vmm_error",
        }
    }
}

/// `rip` of a vCPU just out of reset (with `CS` based at `0xffff_0000`).
const RESET_RIP: u64 = 0xfff0;

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Display for VmEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::GuestReset => write!(f, "guest reset"),
            Self::GuestShutdown => write!(f, "guest powered off"),
            Self::AllVcpusStopped => write!(f, "all vCPUs stopped"),
            Self::GuestHalted => write!(f, "guest halted (every vCPU halted with interrupts off)"),
            Self::WorkloadFinished => write!(f, "workload finished"),
            Self::WorkloadBadParams { vcpu, code } => {
                write!(
                    f,
                    "workload task on vCPU {vcpu} rejected its parameters (code {code})"
                )
            }
            Self::TripleFault { vcpu, rip } => {
                write!(f, "triple fault on vCPU {vcpu} at rip {rip:#x}")?;
                if *rip == RESET_RIP {
                    // KVM on AMD (SVM) reinitialises a vCPU whose guest shut down.
                    write!(
                        f,
                        " (the reset vector: on AMD, KVM resets a vCPU that shuts down, so where \
                         it faulted is lost)"
                    )?;
                }
                Ok(())
            }
            Self::InternalError {
                vcpu,
                suberror,
                rip,
                code,
                data,
            } => {
                let what = if *suberror == 1 {
                    "emulation failure"
                } else {
                    "internal error"
                };
                write!(
                    f,
                    "KVM {what} (suberror {suberror}) on vCPU {vcpu} at rip {rip:#x}"
                )?;
                if !code.is_empty() {
                    write!(f, ", code [{}]", hex_bytes(code))?;
                }
                if !data.is_empty() {
                    let words: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
                    write!(f, ", data [{}]", words.join(" "))?;
                }
                Ok(())
            }
            Self::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "KVM could not enter vCPU {vcpu} (hardware reason {reason:#x})"
                )
            }
            Self::Timeout { seconds } => write!(f, "timeout after {seconds} s"),
            Self::Interrupted => write!(f, "interrupted"),
            Self::Stopped => write!(f, "stopped through the control socket"),
            Self::VmmError(msg) => write!(f, "VMM error: {msg}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_for_failures() {
        let ends = [
            VmEnd::VmmError(String::new()),
            VmEnd::TripleFault { vcpu: 0, rip: 0 },
            VmEnd::InternalError {
                vcpu: 0,
                suberror: 1,
                rip: 0,
                code: vec![],
                data: vec![],
            },
            VmEnd::FailEntry { vcpu: 0, reason: 0 },
            VmEnd::WorkloadBadParams { vcpu: 0, code: 1 },
            VmEnd::Timeout { seconds: 1.0 },
            VmEnd::Interrupted,
        ];
        let mut codes: Vec<i32> = ends.iter().map(VmEnd::exit_code).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ends.len());
        assert!(!codes.contains(&0));
        assert_eq!(VmEnd::GuestReset.exit_code(), 0);
    }

    #[test]
    fn a_triple_fault_at_the_reset_vector_says_the_rip_is_lost() {
        let at = |rip| VmEnd::TripleFault { vcpu: 1, rip }.to_string();
        let reset = at(0xfff0);
        assert!(
            reset.starts_with("triple fault on vCPU 1 at rip 0xfff0 ("),
            "{reset}"
        );
        assert!(reset.contains("lost"), "{reset}");
        assert_eq!(at(0x1000), "triple fault on vCPU 1 at rip 0x1000");
    }

    #[test]
    fn emulation_failure_names_rip_and_code() {
        let e = VmEnd::InternalError {
            vcpu: 1,
            suberror: 1,
            rip: 0xffff_ffff_8100_0000,
            code: vec![0x0f, 0xae],
            data: vec![0x10],
        };
        let line = e.to_string();
        assert!(line.contains("emulation failure"), "{line}");
        assert!(line.contains("0xffffffff81000000"), "{line}");
        assert!(line.contains("0f ae"), "{line}");
        assert!(!line.contains('\n'));
    }
}
