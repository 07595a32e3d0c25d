//! Model-specific registers set at vCPU creation.
//!
//! This module owns the list of MSRs a vCPU gets before its first `KVM_RUN` for a 64-bit Linux
//! boot ([`boot_msr_entries`]) and the logic that writes them ([`setup_msrs`]).
//!
//! The syscall/sysenter MSRs are zeroed so every vCPU starts from the same state (the guest
//! kernel programs them itself). IA32_MISC_ENABLE gets the fast-strings bit (Linux drops its
//! `rep movs/stos` preference without it) and IA32_MTRR_DEF_TYPE enables MTRRs with write-back as
//! the default memory type, which is what firmware leaves behind on a PC; with MTRRs disabled
//! Linux treats all of RAM as uncached for its memory-type bookkeeping.
//!
//! `KVM_SET_MSRS` writes entries in order and stops at the first one KVM refuses, returning the
//! number written. [`setup_msrs`] resumes after a refused *optional* MSR and reports its name, and
//! fails on a refused *required* one. Call it after `VcpuFd::set_cpuid2`: KVM validates some MSRs
//! against the vCPU's CPUID.
//!
//! On the PVM development host (2026-11) KVM accepted every MSR in the list, with or without a
//! prior `set_cpuid2`. There the IA32_TSC write is accepted but has no effect: the guest TSC stays
//! equal to the host TSC (PVM runs guest user mode natively, so it cannot offset `rdtsc`). On
//! VT-x/AMD-V, KVM treats a host write of 0 as "synchronize with the other vCPUs of this VM".

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_STAR: segment selectors for SYSCALL/SYSRET.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR: 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR: compatibility-mode SYSCALL entry point (AMD).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK: RFLAGS mask applied on SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// IA32_KERNEL_GS_BASE: GS base swapped in by SWAPGS.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-strings enable.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
pub const MTRR_DEF_TYPE_ENABLE: u64 = 1 << 11;
/// Memory type encoding for write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// One MSR of the boot set.
#[derive(Debug, Clone, Copy)]
struct BootMsr {
    index: u32,
    value: u64,
    name: &'static str,
    /// A refused required MSR fails [`setup_msrs`]; a refused optional one is reported.
    required: bool,
}

const fn msr(index: u32, value: u64, name: &'static str, required: bool) -> BootMsr {
    BootMsr {
        index,
        value,
        name,
        required,
    }
}

/// The boot set, in the order written. Optional: CSTAR (unused by 64-bit Intel-mode guests and
/// historically not emulated everywhere), the TSC (KVM may own it, e.g. with TSC scaling or
/// a paravirtual TSC) and MISC_ENABLE (a hint; Linux copes without it).
const BOOT_MSRS: &[BootMsr] = &[
    msr(MSR_IA32_SYSENTER_CS, 0, "IA32_SYSENTER_CS", true),
    msr(MSR_IA32_SYSENTER_ESP, 0, "IA32_SYSENTER_ESP", true),
    msr(MSR_IA32_SYSENTER_EIP, 0, "IA32_SYSENTER_EIP", true),
    msr(MSR_STAR, 0, "IA32_STAR", true),
    msr(MSR_LSTAR, 0, "IA32_LSTAR", true),
    msr(MSR_CSTAR, 0, "IA32_CSTAR", false),
    msr(MSR_SYSCALL_MASK, 0, "IA32_FMASK", true),
    msr(MSR_KERNEL_GS_BASE, 0, "IA32_KERNEL_GS_BASE", true),
    msr(
        MSR_MTRR_DEF_TYPE,
        MTRR_DEF_TYPE_ENABLE | MTRR_MEM_TYPE_WB,
        "IA32_MTRR_DEF_TYPE",
        true,
    ),
    msr(MSR_IA32_TSC, 0, "IA32_TSC", false),
    msr(
        MSR_IA32_MISC_ENABLE,
        MISC_ENABLE_FAST_STRING,
        "IA32_MISC_ENABLE",
        false,
    ),
];

/// Errors from writing the boot MSRs.
#[derive(Debug, Error)]
pub enum MsrError {
    /// The MSR list could not be turned into a `kvm_msrs` structure.
    #[error("cannot build the KVM_SET_MSRS argument: {0:?}")]
    Build(vmm_sys_util::fam::Error),
    /// The `KVM_SET_MSRS` ioctl itself failed.
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM refused an MSR the boot needs.
    #[error("KVM refused required MSR {name} ({index:#x})")]
    RequiredRefused {
        /// Architectural name of the MSR.
        name: &'static str,
        /// MSR index.
        index: u32,
    },
    /// KVM reported more MSRs written than were passed in (a kernel/ABI mismatch).
    #[error("KVM_SET_MSRS reported {reported} MSRs written out of {passed}")]
    BadCount {
        /// Count returned by KVM.
        reported: usize,
        /// Number of entries passed.
        passed: usize,
    },
}

/// Outcome of a successful [`setup_msrs`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MsrSetup {
    /// Names of optional MSRs that KVM refused and that were therefore left at KVM's value.
    pub skipped: Vec<&'static str>,
}

/// The MSR values a vCPU gets before a 64-bit Linux boot, in the order [`setup_msrs`] writes them.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    BOOT_MSRS.iter().map(entry).collect()
}

/// Architectural name of a boot-set MSR, for log lines.
pub fn boot_msr_name(index: u32) -> Option<&'static str> {
    BOOT_MSRS.iter().find(|m| m.index == index).map(|m| m.name)
}

fn entry(m: &BootMsr) -> kvm_msr_entry {
    kvm_msr_entry {
        index: m.index,
        data: m.value,
        ..Default::default()
    }
}

/// Writes [`boot_msr_entries`] to `vcpu`. Optional MSRs that KVM refuses are skipped and named in
/// the result; a refused required MSR is an error.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<MsrSetup, MsrError> {
    set_all(BOOT_MSRS, |entries| {
        let msrs = Msrs::from_entries(entries).map_err(MsrError::Build)?;
        vcpu.set_msrs(&msrs).map_err(MsrError::SetMsrs)
    })
}

/// Writes `msrs` with `set` (which has `KVM_SET_MSRS` semantics: it writes a prefix and returns
/// its length), skipping refused optional MSRs.
fn set_all<F>(msrs: &[BootMsr], mut set: F) -> Result<MsrSetup, MsrError>
where
    F: FnMut(&[kvm_msr_entry]) -> Result<usize, MsrError>,
{
    let mut report = MsrSetup::default();
    let mut rest = msrs;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest.iter().map(entry).collect();
        let written = set(&entries)?;
        let Some(refused) = rest.get(written) else {
            if written == rest.len() {
                break;
            }
            return Err(MsrError::BadCount {
                reported: written,
                passed: rest.len(),
            });
        };
        if refused.required {
            return Err(MsrError::RequiredRefused {
                name: refused.name,
                index: refused.index,
            });
        }
        report.skipped.push(refused.name);
        rest = &rest[written + 1..];
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use mirrorball_profiler::testing::kvm_or_skip;

    /// A fake KVM_SET_MSRS that refuses the MSRs in `refuse` and records what it accepted.
    fn fake<'a>(
        refuse: &'a [u32],
        accepted: &'a mut Vec<u32>,
    ) -> impl FnMut(&[kvm_msr_entry]) -> Result<usize, MsrError> + 'a {
        move |entries| {
            let mut n = 0;
            for e in entries {
                if refuse.contains(&e.index) {
                    break;
                }
                accepted.push(e.index);
                n += 1;
            }
            Ok(n)
        }
    }

    #[test]
    fn boot_set_has_the_boot_values() {
        let entries = boot_msr_entries();
        let value = |i| entries.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(value(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(value(MSR_IA32_MISC_ENABLE), Some(1));
        for zeroed in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ] {
            assert_eq!(value(zeroed), Some(0), "{zeroed:#x}");
        }
        assert_eq!(entries.len(), BOOT_MSRS.len());
        assert_eq!(boot_msr_name(MSR_LSTAR), Some("IA32_LSTAR"));
        assert_eq!(boot_msr_name(0x1234), None);
    }

    #[test]
    fn everything_accepted_skips_nothing() {
        let mut accepted = Vec::new();
        let report = set_all(BOOT_MSRS, fake(&[], &mut accepted)).unwrap();
        assert!(report.skipped.is_empty());
        assert_eq!(accepted.len(), BOOT_MSRS.len());
    }

    #[test]
    fn refused_optional_msrs_are_skipped_and_named() {
        let mut accepted = Vec::new();
        let refuse = [MSR_CSTAR, MSR_IA32_MISC_ENABLE];
        let report = set_all(BOOT_MSRS, fake(&refuse, &mut accepted)).unwrap();
        assert_eq!(report.skipped, vec!["IA32_CSTAR", "IA32_MISC_ENABLE"]);
        // Everything else, including MSRs after a refused one, was still written.
        assert_eq!(accepted.len(), BOOT_MSRS.len() - 2);
        assert!(accepted.contains(&MSR_SYSCALL_MASK));
        assert!(accepted.contains(&MSR_IA32_TSC));
    }

    #[test]
    fn refused_required_msr_is_an_error() {
        let mut accepted = Vec::new();
        let err = set_all(BOOT_MSRS, fake(&[MSR_MTRR_DEF_TYPE], &mut accepted)).unwrap_err();
        assert!(matches!(
            err,
            MsrError::RequiredRefused {
                index: MSR_MTRR_DEF_TYPE,
                name: "IA32_MTRR_DEF_TYPE"
            }
        ));
    }

    #[test]
    fn impossible_counts_are_errors_not_panics() {
        let err = set_all(BOOT_MSRS, |e| Ok(e.len() + 1)).unwrap_err();
        assert!(matches!(err, MsrError::BadCount { .. }));
    }

    fn read_msr(vcpu: &VcpuFd, index: u32) -> u64 {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1, "read {index:#x}");
        msrs.as_slice()[0].data
    }

    #[test]
    fn setup_msrs_on_kvm_vcpu() {
        let Some(kvm) = kvm_or_skip("setup_msrs_on_kvm_vcpu") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();

        // Dirty one register so the read-back proves setup_msrs wrote it.
        let lstar = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_LSTAR,
            data: 0xffff_ffff_8100_0000,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.set_msrs(&lstar).unwrap(), 1);

        let report = setup_msrs(&vcpu).unwrap();
        eprintln!(
            "optional MSRs refused by this KVM: {:?}; guest TSC after writing 0: {:#x}",
            report.skipped,
            read_msr(&vcpu, MSR_IA32_TSC)
        );

        assert_eq!(read_msr(&vcpu, MSR_LSTAR), 0);
        assert_eq!(
            read_msr(&vcpu, MSR_MTRR_DEF_TYPE),
            MTRR_DEF_TYPE_ENABLE | MTRR_MEM_TYPE_WB
        );
        if !report.skipped.contains(&"IA32_MISC_ENABLE") {
            assert_ne!(
                read_msr(&vcpu, MSR_IA32_MISC_ENABLE) & MISC_ENABLE_FAST_STRING,
                0
            );
        }
    }
}
