//! CPUID filtering for the guest.
//!
//! This module owns what a vCPU learns from `cpuid`: [`filter_cpuid`] turns the host's
//! `KVM_GET_SUPPORTED_CPUID` result into the table for one vCPU before `VcpuFd::set_cpuid2`.
//!
//! On every host it sets the hypervisor bit and a flat topology — `num_vcpus` cores of one thread
//! each in one package, APIC id = vCPU index — in leaves 1, 4, 0xB and 0x1F (and, for an AMD
//! vendor string, 0x80000008, 0x8000001D and 0x8000001E), matching the MP table of
//! [`super::mptable`]; and it fills the brand string (0x80000002–4) when KVM leaves it empty
//! (`brand`).
//!
//! On a PVM host ([`HostKind::Pvm`]) guest kernel code is run by KVM's instruction emulator,
//! which lacks XSAVE, POPCNT, the AVX family, BMI, CLAC/STAC and more. There it also hides every
//! feature in one auditable table ([`pvm_hidden_table`]) so that a stock Linux, which picks
//! instruction variants from CPUID, never uses them; it clears the XSAVE leaf 0xD and reports the
//! vendor "GenuineIntel" (Linux then skips the AMD-only x87 `fnclex` workaround, which the
//! emulator cannot run). Features KVM emulates itself (x2APIC, TSC-deadline timer) stay visible.
//! With the Intel vendor and an AMD family number, Linux's CPU-bug tables treat the vCPU as an
//! unknown Intel part; `mitigations=off` on the guest command line avoids the costlier
//! mitigations.
//!
//! PVM may not honour all of it. On the development host (`kvm_pvm` with `pvm_native=Y`,
//! 2026-11), `KVM_SET_CPUID2` puts the host's native instruction-set features back into leaf 1
//! ECX/EDX and leaf 7.0, and restores leaf 0xD, whatever the VMM passes (a guest `cpuid` in kernel
//! mode then sees POPCNT, XSAVE, AVX, SMAP, ...). The vendor string, leaf 0x80000001 and the
//! topology leaves are honoured. So after `set_cpuid2`, read the table back with
//! `VcpuFd::get_cpuid2` and pass it to [`visible_pvm_hidden_features`] (for the log) and
//! [`pvm_guest_kernel_args`]: those features must be disabled on the guest kernel command line
//! instead (`noxsave`, `clearcpuid=`).

use std::path::Path;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use thiserror::Error;

mod brand;
mod pvm;
pub use brand::{brand_bytes, brand_text, FALLBACK_BRAND};
use pvm::hide_for_pvm;
pub use pvm::{
    hidden_features_on_pvm, pvm_guest_kernel_args, pvm_hidden_table, visible_pvm_hidden_features,
    PvmKernelArgs, CLEARCPUID_MAX_LEN,
};

/// The kind of KVM serving `/dev/kvm`, which decides how much CPUID must hide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// KVM on Intel VT-x (`kvm_intel`).
    Intel,
    /// KVM on AMD-V (`kvm_amd`).
    Amd,
    /// PVM (`kvm_pvm`): shadow paging, guest kernel mode is instruction-emulated.
    Pvm,
    /// No KVM vendor module found (e.g. KVM built in without module entries in sysfs).
    Unknown,
}

impl HostKind {
    /// Short lowercase name ("intel", "amd", "pvm", "unknown").
    pub fn name(self) -> &'static str {
        match self {
            HostKind::Intel => "intel",
            HostKind::Amd => "amd",
            HostKind::Pvm => "pvm",
            HostKind::Unknown => "unknown",
        }
    }

    /// Detects the KVM flavour from `/sys/module`.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Detects the KVM flavour from a sysfs module directory. PVM is checked first: a PVM
    /// host may also have a hardware vendor module loaded.
    pub fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            HostKind::Pvm
        } else if sys_module.join("kvm_intel").exists() {
            HostKind::Intel
        } else if sys_module.join("kvm_amd").exists() {
            HostKind::Amd
        } else {
            HostKind::Unknown
        }
    }
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One feature bit: `cpuid(leaf, subleaf).reg[bit]`, with its Linux name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidBit {
    /// CPUID function (EAX input).
    pub leaf: u32,
    /// CPUID index (ECX input); 0 for leaves without subleaves.
    pub subleaf: u32,
    /// Output register holding the bit.
    pub reg: Reg,
    /// Bit number, 0–31.
    pub bit: u8,
    /// Feature name as Linux spells it.
    pub name: &'static str,
}

/// Errors from [`filter_cpuid`].
#[derive(Debug, Error)]
pub enum CpuidError {
    /// The VM must have at least one vCPU.
    #[error("the number of vCPUs must be at least 1")]
    NoVcpus,
    /// The vCPU index is not below the number of vCPUs.
    #[error("vCPU index {index} is out of range for {count} vCPUs")]
    VcpuIndexOutOfRange {
        /// The vCPU index.
        index: u8,
        /// The number of vCPUs.
        count: u8,
    },
    /// The topology leaves do not fit in the CPUID table (KVM allows at most 256 entries).
    #[error("cannot add topology leaf {leaf:#x} to the CPUID table: {source:?}")]
    TooManyEntries {
        /// Leaf being added.
        leaf: u32,
        /// Error from the FAM wrapper.
        source: vmm_sys_util::fam::Error,
    },
}

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

/// "GenuineIntel" as leaf 0 returns it in EBX, EDX, ECX.
const INTEL_VENDOR: [u32; 3] = vendor_regs(b"GenuineIntel");
const AMD_VENDORS: [[u32; 3]; 2] = [vendor_regs(b"AuthenticAMD"), vendor_regs(b"HygonGenuine")];

const fn vendor_regs(s: &[u8; 12]) -> [u32; 3] {
    [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    ]
}

const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
const LEAF1_EBX_COUNT_SHIFT: u32 = 16;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const TOPO_LEVEL_SMT: u32 = 1;
const TOPO_LEVEL_CORE: u32 = 2;

fn reg(entry: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Reg::Eax => entry.eax,
        Reg::Ebx => entry.ebx,
        Reg::Ecx => entry.ecx,
        Reg::Edx => entry.edx,
    }
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Number of APIC-id bits needed for `n` cores (ceil(log2(n))).
fn id_bits(n: u8) -> u32 {
    u32::from(n).next_power_of_two().trailing_zeros()
}

/// Sets the CPUID of vCPU `index` of `count` (on `host`): `supported` (what KVM supports),
/// filtered by [`filter_cpuid`]. The error names the step that failed.
pub fn set_guest_cpuid(
    vcpu: &kvm_ioctls::VcpuFd,
    supported: &CpuId,
    index: usize,
    count: usize,
    host: HostKind,
) -> Result<(), String> {
    let (index8, count8) = (
        u8::try_from(index).map_err(|e| format!("vCPU index: {e}"))?,
        u8::try_from(count).map_err(|e| format!("vCPU count: {e}"))?,
    );
    let mut cpuid = supported.clone();
    filter_cpuid(&mut cpuid, index8, count8, host).map_err(|e| format!("CPUID filter: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2: {e}"))
}

/// Rewrites `cpuid` (from `Kvm::get_supported_cpuid`) for vCPU `vcpu_index` of `num_vcpus`;
/// see the module documentation for what changes on which host. Apply it to a fresh copy of the
/// supported table for each vCPU. After an error `cpuid` may be partly rewritten: discard it.
pub fn filter_cpuid(
    cpuid: &mut CpuId,
    vcpu_index: u8,
    num_vcpus: u8,
    host: HostKind,
) -> Result<(), CpuidError> {
    if num_vcpus == 0 {
        return Err(CpuidError::NoVcpus);
    }
    if vcpu_index >= num_vcpus {
        return Err(CpuidError::VcpuIndexOutOfRange {
            index: vcpu_index,
            count: num_vcpus,
        });
    }
    if host == HostKind::Pvm {
        hide_for_pvm(cpuid);
    }
    let amd_vendor = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_VENDOR && AMD_VENDORS.contains(&[e.ebx, e.edx, e.ecx]));
    let apic_id = u32::from(vcpu_index);
    let bits = id_bits(num_vcpus);
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx &= 0x0000_ffff;
                e.ebx |= apic_id << LEAF1_EBX_APIC_ID_SHIFT;
                e.ebx |= u32::from(num_vcpus) << LEAF1_EBX_COUNT_SHIFT;
                e.edx |= LEAF1_EDX_HTT;
                e.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            LEAF_CACHE => set_cache_sharing(e, bits, true),
            LEAF_AMD_CACHE if amd_vendor => set_cache_sharing(e, bits, false),
            LEAF_AMD_SIZES if amd_vendor => {
                // ECX[15:12] APIC id bits for cores, ECX[7:0] number of cores - 1.
                e.ecx &= !0xf0ff;
                e.ecx |= (bits << 12) | (u32::from(num_vcpus) - 1);
            }
            LEAF_AMD_TOPOLOGY if amd_vendor => {
                e.eax = apic_id; // Extended APIC id.
                e.ebx = apic_id & 0xff; // Core id; EBX[15:8] = threads per core - 1 = 0.
                e.ecx = 0; // Node 0, one node per package.
                e.edx = 0;
            }
            _ => {}
        }
    }
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        set_extended_topology(cpuid, leaf, apic_id, num_vcpus)?;
    }
    brand::fill_brand_string(cpuid)
}

/// Sets the sharing fields of a deterministic cache parameters entry (leaf 4 or 0x8000001D):
/// L1/L2 are per core, L3 and beyond are shared by the package. For leaf 4 also sets
/// `EAX[31:26]`, the number of core ids in the package minus one.
fn set_cache_sharing(e: &mut kvm_cpuid_entry2, core_bits: u32, with_cores: bool) {
    let cache_type = e.eax & 0x1f;
    if cache_type == 0 {
        return; // No (more) caches: the entry carries no topology.
    }
    let level = (e.eax >> 5) & 0x7;
    let package_ids = (1u32 << core_bits) - 1;
    let sharing = if level <= 2 {
        0
    } else {
        package_ids.min(0xfff)
    };
    e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
    if with_cores {
        e.eax = (e.eax & 0x03ff_ffff) | (package_ids.min(0x3f) << 26);
    }
}

/// Replaces the subleaves of `leaf` (0xB or 0x1F), if the host reports that leaf, with an SMT
/// level of one thread, a core level of `num_vcpus` cores, and the terminating invalid level.
fn set_extended_topology(
    cpuid: &mut CpuId,
    leaf: u32,
    apic_id: u32,
    num_vcpus: u8,
) -> Result<(), CpuidError> {
    if !cpuid.as_slice().iter().any(|e| e.function == leaf) {
        return Ok(());
    }
    cpuid.retain(|e| e.function != leaf);
    let level = |index: u32, shift: u32, count: u32, kind: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: count,
        ecx: (kind << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    for e in [
        level(0, 0, 1, TOPO_LEVEL_SMT),
        level(1, id_bits(num_vcpus), u32::from(num_vcpus), TOPO_LEVEL_CORE),
        level(2, 0, 0, 0),
    ] {
        cpuid
            .push(e)
            .map_err(|source| CpuidError::TooManyEntries { leaf, source })?;
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::pvm::PVM_HIDDEN;
    use super::*;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use mirrorball_profiler::testing::kvm_or_skip;

    pub(super) fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A host-like table with every feature bit set and the given vendor.
    pub(super) fn host(vendor: &[u8; 12]) -> CpuId {
        let [vb, vd, vc] = vendor_regs(vendor);
        let all = u32::MAX;
        CpuId::from_entries(&[
            leaf(0, 0, [0x1f, vb, vc, vd]),
            // APIC id 5, count 2, CLFLUSH size 8.
            leaf(1, 0, [0x00a0_0f11, 0x0502_0800, 0x7fff_ffff, 0x078b_fbff]),
            leaf(4, 0, [0x0400_4121, 0, 0, 0]), // L1 data, 2 sharing.
            leaf(4, 1, [0x0400_4163, 0, 0, 0]), // L3 unified.
            leaf(4, 2, [0, 0, 0, 0]),
            leaf(7, 0, [1, all, all, all]),
            leaf(7, 1, [all, 0, 0, 0]),
            leaf(0xb, 0, [1, 2, 0x100, 9]),
            leaf(0xb, 1, [4, 16, 0x201, 9]),
            leaf(0xd, 0, [0x207, 0x988, 0x988, 0]),
            leaf(0xd, 1, [0xf, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, all, all]),
            leaf(0x8000_0008, 0, [0x3030, all, 0x7001, 0]),
            leaf(0x8000_001d, 0, [0x121, 0, 0, 0]),
            leaf(0x8000_001d, 3, [0x4163, 0, 0, 0]),
            leaf(0x8000_001e, 0, [0, 0, 0, 0]),
        ])
        .unwrap()
    }

    pub(super) fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    pub(super) fn bit(cpuid: &CpuId, f: &CpuidBit) -> bool {
        reg(&get(cpuid, f.leaf, f.subleaf), f.reg) & (1 << f.bit) != 0
    }

    pub(super) fn named(name: &str) -> CpuidBit {
        *PVM_HIDDEN.iter().find(|f| f.name == name).unwrap()
    }

    pub(super) fn filtered(vendor: &[u8; 12], index: u8, count: u8, kind: HostKind) -> CpuId {
        let mut cpuid = host(vendor);
        filter_cpuid(&mut cpuid, index, count, kind).unwrap();
        cpuid
    }

    #[test]
    fn leaf1_apic_id_count_htt_and_hypervisor_per_vcpu() {
        for kind in [
            HostKind::Intel,
            HostKind::Amd,
            HostKind::Pvm,
            HostKind::Unknown,
        ] {
            for i in 0..4 {
                let e = get(&filtered(b"GenuineIntel", i, 4, kind), 1, 0);
                assert_eq!(e.ebx >> 24, u32::from(i), "{kind:?}");
                assert_eq!((e.ebx >> 16) & 0xff, 4);
                assert_eq!(e.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
                assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
                assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
            }
        }
    }

    #[test]
    fn leaf_0xb_describes_flat_topology_per_vcpu() {
        for i in 0..3u8 {
            let c = filtered(b"GenuineIntel", i, 3, HostKind::Intel);
            assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
            let smt = get(&c, 0xb, 0);
            let core = get(&c, 0xb, 1);
            let end = get(&c, 0xb, 2);
            assert_eq!(
                [smt.eax, smt.ebx, smt.ecx, smt.edx],
                [0, 1, 0x100, u32::from(i)]
            );
            assert_eq!(
                [core.eax, core.ebx, core.ecx, core.edx],
                [2, 3, 0x201, u32::from(i)]
            );
            assert_eq!((end.ebx, end.ecx >> 8, end.edx), (0, 0, u32::from(i)));
            assert!([smt, core, end]
                .iter()
                .all(|e| e.flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX));
        }
        // No 0x1F leaf on the host: none is invented.
        let c = filtered(b"GenuineIntel", 0, 3, HostKind::Intel);
        assert!(!c.as_slice().iter().any(|e| e.function == 0x1f));
    }

    #[test]
    fn leaf4_core_and_sharing_fields() {
        let c = filtered(b"GenuineIntel", 1, 4, HostKind::Intel);
        let (l1, l3, end) = (get(&c, 4, 0), get(&c, 4, 1), get(&c, 4, 2));
        assert_eq!(l1.eax >> 26, 3, "4 core ids per package");
        assert_eq!((l1.eax >> 14) & 0xfff, 0, "L1 per core");
        assert_eq!((l3.eax >> 14) & 0xfff, 3, "L3 shared by the package");
        assert_eq!(l3.eax & 0x3fff, 0x0163, "cache type and level kept");
        assert_eq!(end.eax, 0, "terminator untouched");
    }

    #[test]
    fn amd_topology_leaves_follow_the_vcpu() {
        let c = filtered(b"AuthenticAMD", 2, 3, HostKind::Amd);
        let t = get(&c, 0x8000_001e, 0);
        assert_eq!((t.eax, t.ebx & 0xffff), (2, 2));
        let sizes = get(&c, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 2, "3 cores");
        assert_eq!((sizes.ecx >> 12) & 0xf, 2, "2 APIC id bits for cores");
        assert_eq!((get(&c, 0x8000_001d, 3).eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn hardware_hosts_keep_features_and_vendor() {
        for (vendor, kind) in [
            (b"GenuineIntel", HostKind::Intel),
            (b"AuthenticAMD", HostKind::Amd),
        ] {
            let c = filtered(vendor, 0, 2, kind);
            for f in PVM_HIDDEN {
                assert!(bit(&c, f), "{} hidden on {kind:?}", f.name);
            }
            let v = get(&c, 0, 0);
            assert_eq!([v.ebx, v.edx, v.ecx], vendor_regs(vendor));
            assert_eq!(get(&c, 0xd, 0).eax, 0x207);
        }
    }

    #[test]
    fn bad_vcpu_numbers_are_errors() {
        let mut c = host(b"GenuineIntel");
        assert!(matches!(
            filter_cpuid(&mut c, 0, 0, HostKind::Intel),
            Err(CpuidError::NoVcpus)
        ));
        assert!(matches!(
            filter_cpuid(&mut c, 2, 2, HostKind::Intel),
            Err(CpuidError::VcpuIndexOutOfRange { index: 2, count: 2 })
        ));
        filter_cpuid(&mut c, 254, 255, HostKind::Pvm).unwrap();
        assert_eq!(get(&c, 0xb, 1).eax, 8);
        assert_eq!(get(&c, 4, 0).eax >> 26, 0x3f, "clamped to the 6-bit field");
    }

    #[test]
    fn detect_reads_sysfs_modules() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = dir.as_path();
        assert_eq!(HostKind::detect_in(root), HostKind::Unknown);
        std::fs::create_dir(root.join("kvm_amd")).unwrap();
        assert_eq!(HostKind::detect_in(root), HostKind::Amd);
        std::fs::create_dir(root.join("kvm_intel")).unwrap();
        assert_eq!(HostKind::detect_in(root), HostKind::Intel);
        std::fs::create_dir(root.join("kvm_pvm")).unwrap();
        assert_eq!(HostKind::detect_in(root), HostKind::Pvm);
    }

    #[test]
    fn filtered_supported_cpuid_is_accepted_by_kvm() {
        let Some(kvm) = kvm_or_skip("filtered_supported_cpuid_is_accepted_by_kvm") else {
            return;
        };
        let kind = HostKind::detect();
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = kvm.create_vm().unwrap();
        for i in 0..2u8 {
            let vcpu = vm.create_vcpu(u64::from(i)).unwrap();
            let mut cpuid = supported.clone();
            filter_cpuid(&mut cpuid, i, 2, kind).unwrap();
            vcpu.set_cpuid2(&cpuid).unwrap();
            let back = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
            assert_eq!(get(&back, 1, 0).ebx >> 24, u32::from(i));
            if back.as_slice().iter().any(|e| e.function == 0xb) {
                assert_eq!(get(&back, 0xb, 0).edx, u32::from(i));
            }
            if kind == HostKind::Pvm {
                let v = get(&back, 0, 0);
                assert_eq!([v.ebx, v.edx, v.ecx], INTEL_VENDOR);
                let args = pvm_guest_kernel_args(&back);
                eprintln!(
                    "hidden features this PVM host put back: {:?}; guest kernel args: {:?}",
                    visible_pvm_hidden_features(&back),
                    args
                );
                assert!(args.not_cleared.is_empty(), "{args:?}");
            } else {
                assert_eq!(
                    visible_pvm_hidden_features(&back),
                    visible_pvm_hidden_features(&supported)
                );
            }
        }
    }
}
