//! The PVM feature table: what [`super::filter_cpuid`] hides on a PVM host, and how to tell the
//! guest kernel about features the host refuses to hide.
//!
//! Every entry is one `(leaf, subleaf, register, bit, name)` row so the list is easy to audit;
//! names are Linux's (`X86_FEATURE_*` in lower case, the `/proc/cpuinfo` flag where there is one).

use kvm_bindings::CpuId;

use super::{reg, reg_mut, CpuidBit, Reg, INTEL_VENDOR, LEAF_VENDOR, LEAF_XSAVE};
use Reg::{Eax, Ebx, Ecx, Edx};

const fn hide(leaf: u32, subleaf: u32, reg: Reg, bit: u8, name: &'static str) -> CpuidBit {
    CpuidBit {
        leaf,
        subleaf,
        reg,
        bit,
        name,
    }
}

/// Features hidden on PVM. Criterion: instructions the emulator cannot execute, or features
/// that make Linux execute such instructions (or change paging modes) in kernel mode.
pub(super) const PVM_HIDDEN: &[CpuidBit] = &[
    // Leaf 1 ECX: SSE3 and later vector/crypto extensions, instruction extensions.
    hide(0x1, 0, Ecx, 0, "pni"),
    hide(0x1, 0, Ecx, 1, "pclmulqdq"),
    hide(0x1, 0, Ecx, 3, "monitor"),
    hide(0x1, 0, Ecx, 5, "vmx"),
    hide(0x1, 0, Ecx, 9, "ssse3"),
    hide(0x1, 0, Ecx, 12, "fma"),
    hide(0x1, 0, Ecx, 19, "sse4_1"),
    hide(0x1, 0, Ecx, 20, "sse4_2"), // Also CRC32, used by the kernel's crc32c.
    hide(0x1, 0, Ecx, 22, "movbe"),
    hide(0x1, 0, Ecx, 23, "popcnt"),
    hide(0x1, 0, Ecx, 25, "aes"),
    hide(0x1, 0, Ecx, 26, "xsave"),
    hide(0x1, 0, Ecx, 27, "osxsave"),
    hide(0x1, 0, Ecx, 28, "avx"),
    hide(0x1, 0, Ecx, 29, "f16c"),
    hide(0x1, 0, Ecx, 30, "rdrand"),
    // Leaf 7.0 EBX.
    hide(0x7, 0, Ebx, 0, "fsgsbase"), // RDFSBASE/WRGSBASE on every context switch.
    hide(0x7, 0, Ebx, 2, "sgx"),
    hide(0x7, 0, Ebx, 3, "bmi1"),
    hide(0x7, 0, Ebx, 4, "hle"),
    hide(0x7, 0, Ebx, 5, "avx2"),
    hide(0x7, 0, Ebx, 7, "smep"),
    hide(0x7, 0, Ebx, 8, "bmi2"),
    hide(0x7, 0, Ebx, 9, "erms"),
    hide(0x7, 0, Ebx, 10, "invpcid"),
    hide(0x7, 0, Ebx, 11, "rtm"),
    hide(0x7, 0, Ebx, 14, "mpx"),
    hide(0x7, 0, Ebx, 16, "avx512f"),
    hide(0x7, 0, Ebx, 17, "avx512dq"),
    hide(0x7, 0, Ebx, 18, "rdseed"),
    hide(0x7, 0, Ebx, 19, "adx"),
    hide(0x7, 0, Ebx, 20, "smap"), // STAC/CLAC around every user access.
    hide(0x7, 0, Ebx, 21, "avx512ifma"),
    hide(0x7, 0, Ebx, 23, "clflushopt"),
    hide(0x7, 0, Ebx, 24, "clwb"),
    hide(0x7, 0, Ebx, 25, "intel_pt"),
    hide(0x7, 0, Ebx, 26, "avx512pf"),
    hide(0x7, 0, Ebx, 27, "avx512er"),
    hide(0x7, 0, Ebx, 28, "avx512cd"),
    hide(0x7, 0, Ebx, 29, "sha_ni"),
    hide(0x7, 0, Ebx, 30, "avx512bw"),
    hide(0x7, 0, Ebx, 31, "avx512vl"),
    // Leaf 7.0 ECX.
    hide(0x7, 0, Ecx, 1, "avx512vbmi"),
    hide(0x7, 0, Ecx, 2, "umip"),
    hide(0x7, 0, Ecx, 3, "pku"),
    hide(0x7, 0, Ecx, 4, "ospke"),
    hide(0x7, 0, Ecx, 5, "waitpkg"),
    hide(0x7, 0, Ecx, 6, "avx512_vbmi2"),
    hide(0x7, 0, Ecx, 7, "shstk"),
    hide(0x7, 0, Ecx, 8, "gfni"),
    hide(0x7, 0, Ecx, 9, "vaes"),
    hide(0x7, 0, Ecx, 10, "vpclmulqdq"),
    hide(0x7, 0, Ecx, 11, "avx512_vnni"),
    hide(0x7, 0, Ecx, 12, "avx512_bitalg"),
    hide(0x7, 0, Ecx, 14, "avx512_vpopcntdq"),
    hide(0x7, 0, Ecx, 16, "la57"), // 5-level paging.
    hide(0x7, 0, Ecx, 22, "rdpid"),
    hide(0x7, 0, Ecx, 25, "cldemote"),
    hide(0x7, 0, Ecx, 27, "movdiri"),
    hide(0x7, 0, Ecx, 28, "movdir64b"),
    hide(0x7, 0, Ecx, 29, "enqcmd"),
    // Leaf 7.0 EDX.
    hide(0x7, 0, Edx, 2, "avx512_4vnniw"),
    hide(0x7, 0, Edx, 3, "avx512_4fmaps"),
    hide(0x7, 0, Edx, 4, "fsrm"),
    hide(0x7, 0, Edx, 8, "avx512_vp2intersect"),
    hide(0x7, 0, Edx, 14, "serialize"), // SERIALIZE in sync_core().
    hide(0x7, 0, Edx, 16, "tsxldtrk"),
    hide(0x7, 0, Edx, 20, "ibt"),
    hide(0x7, 0, Edx, 22, "amx_bf16"),
    hide(0x7, 0, Edx, 23, "avx512_fp16"),
    hide(0x7, 0, Edx, 24, "amx_tile"),
    hide(0x7, 0, Edx, 25, "amx_int8"),
    // Leaf 7.1 EAX.
    hide(0x7, 1, Eax, 4, "avx_vnni"),
    hide(0x7, 1, Eax, 5, "avx512_bf16"),
    hide(0x7, 1, Eax, 6, "lass"),
    hide(0x7, 1, Eax, 7, "cmpccxadd"),
    hide(0x7, 1, Eax, 10, "fzrm"),
    hide(0x7, 1, Eax, 11, "fsrs"),
    hide(0x7, 1, Eax, 12, "fsrc"),
    hide(0x7, 1, Eax, 17, "fred"), // New exception delivery (ERETS/ERETU).
    hide(0x7, 1, Eax, 18, "lkgs"),
    hide(0x7, 1, Eax, 19, "wrmsrns"),
    hide(0x7, 1, Eax, 23, "avx_ifma"),
    hide(0x7, 1, Eax, 26, "lam"),
    // Leaf 0x80000001 ECX/EDX (AMD extensions).
    hide(0x8000_0001, 0, Ecx, 2, "svm"),
    hide(0x8000_0001, 0, Ecx, 5, "abm"), // LZCNT.
    hide(0x8000_0001, 0, Ecx, 6, "sse4a"),
    hide(0x8000_0001, 0, Ecx, 11, "xop"),
    hide(0x8000_0001, 0, Ecx, 15, "lwp"),
    hide(0x8000_0001, 0, Ecx, 16, "fma4"),
    hide(0x8000_0001, 0, Ecx, 21, "tbm"),
    hide(0x8000_0001, 0, Ecx, 29, "mwaitx"),
    hide(0x8000_0001, 0, Edx, 26, "pdpe1gb"), // 1 GiB pages in the shadow MMU.
    hide(0x8000_0001, 0, Edx, 27, "rdtscp"),  // RDTSCP in rdtsc_ordered().
    // Leaf 0x80000008 EBX.
    hide(0x8000_0008, 0, Ebx, 0, "clzero"),
    hide(0x8000_0008, 0, Ebx, 4, "rdpru"),
    hide(0x8000_0008, 0, Ebx, 9, "wbnoinvd"),
];

const fn table_names<const N: usize>(table: &[CpuidBit]) -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = table[i].name;
        i += 1;
    }
    names
}

static PVM_HIDDEN_NAMES: [&str; PVM_HIDDEN.len()] = table_names(PVM_HIDDEN);

/// Names of the features [`super::filter_cpuid`] hides on PVM, for a log line. Leaf 0xD (XSAVE state
/// components) is cleared as a whole in addition.
pub fn hidden_features_on_pvm() -> &'static [&'static str] {
    &PVM_HIDDEN_NAMES
}

/// Features of the PVM table that `cpuid` still reports, in table order. Call it with the result
/// of `VcpuFd::get_cpuid2` after `set_cpuid2` to learn which hidden features a PVM host put back
/// (see the module documentation); empty when everything stayed hidden.
pub fn visible_pvm_hidden_features(cpuid: &CpuId) -> Vec<&'static str> {
    PVM_HIDDEN
        .iter()
        .filter(|f| {
            cpuid.as_slice().iter().any(|e| {
                e.function == f.leaf && e.index == f.subleaf && reg(e, f.reg) & (1 << f.bit) != 0
            })
        })
        .map(|f| f.name)
        .collect()
}

/// The table behind [`hidden_features_on_pvm`], with leaf, register and bit of each feature.
pub fn pvm_hidden_table() -> &'static [CpuidBit] {
    PVM_HIDDEN
}

/// Clears the PVM table's bits, zeroes leaf 0xD and sets the Intel vendor string.
pub(super) fn hide_for_pvm(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        for f in PVM_HIDDEN {
            if e.function == f.leaf && e.index == f.subleaf {
                *reg_mut(e, f.reg) &= !(1u32 << f.bit);
            }
        }
        match e.function {
            LEAF_XSAVE => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            LEAF_VENDOR => [e.ebx, e.edx, e.ecx] = INTEL_VENDOR,
            _ => {}
        }
    }
}

/// Longest `clearcpuid=` value Linux reads: it copies the option into a 128-byte buffer and
/// ignores what does not fit.
pub const CLEARCPUID_MAX_LEN: usize = 127;

/// Features that Linux turns off by itself after `noxsave`, through its CPUID dependency table
/// (all need XSAVE, directly or through AVX/AVX-512F/AVX-512VL).
const IMPLIED_BY_NOXSAVE: &[&str] = &[
    "xsave",
    "osxsave",
    "avx",
    "avx2",
    "fma",
    "pku",
    "mpx",
    "vaes",
    "vpclmulqdq",
    "avx512f",
    "avx512dq",
    "avx512ifma",
    "avx512pf",
    "avx512er",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_4vnniw",
    "avx512_4fmaps",
    "avx512_vp2intersect",
    "avx512_bf16",
];

/// Features no kernel code uses once `noxsave` has run, so they need no `clearcpuid=` bit (the
/// value is limited to [`CLEARCPUID_MAX_LEN`] and hosts with many features fill it): AVX-VNNI's
/// only users are crypto routines that first require AVX, and the fast zero-length/short
/// `rep stos`/`rep cmps` hints (FZRM, FSRS, FSRC) are read by no Linux kernel code, only passed
/// on to KVM guests. They stay hidden in CPUID.
const NO_USER_AFTER_NOXSAVE: &[&str] = &["avx_vnni", "fzrm", "fsrs", "fsrc"];

/// Guest kernel parameters that disable, from inside the guest, the PVM-hidden features a host
/// still reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PvmKernelArgs {
    /// Space-separated parameters to append to the kernel command line (`noxsave` and/or
    /// `clearcpuid=<bit>,...`); empty when every feature stayed hidden.
    pub args: String,
    /// Visible features that did not fit in the `clearcpuid=` value.
    pub not_cleared: Vec<&'static str>,
}

/// Linux's capability word for a CPUID register (`arch/x86/include/asm/cpufeatures.h`). Bits are
/// given to `clearcpuid=` as `word * 32 + bit`, which every Linux version accepts (names only
/// work from 5.19 on and take more of the 127 characters).
fn linux_cap_word(leaf: u32, subleaf: u32, reg: Reg) -> Option<u32> {
    match (leaf, subleaf, reg) {
        (0x1, 0, Reg::Edx) => Some(0),
        (0x8000_0001, 0, Reg::Edx) => Some(1),
        (0x1, 0, Reg::Ecx) => Some(4),
        (0x8000_0001, 0, Reg::Ecx) => Some(6),
        (0x7, 0, Reg::Ebx) => Some(9),
        (0x7, 1, Reg::Eax) => Some(12),
        (0x8000_0008, 0, Reg::Ebx) => Some(13),
        (0x7, 0, Reg::Ecx) => Some(16),
        (0x7, 0, Reg::Edx) => Some(18),
        _ => None,
    }
}

/// Builds guest kernel parameters that turn off every PVM-hidden feature still set in
/// `guest_cpuid` (the vCPU's table as read back with `VcpuFd::get_cpuid2`): `noxsave` if XSAVE
/// is visible (which also drops the AVX family), then `clearcpuid=` with the others, in table
/// order, as long as they fit in [`CLEARCPUID_MAX_LEN`].
pub fn pvm_guest_kernel_args(guest_cpuid: &CpuId) -> PvmKernelArgs {
    let visible = visible_pvm_hidden_features(guest_cpuid);
    let mut out = PvmKernelArgs::default();
    let mut words = Vec::new();
    if visible.contains(&"xsave") {
        words.push("noxsave".to_string());
    }
    let mut value = String::new();
    for f in PVM_HIDDEN.iter().filter(|f| visible.contains(&f.name)) {
        if visible.contains(&"xsave")
            && (IMPLIED_BY_NOXSAVE.contains(&f.name) || NO_USER_AFTER_NOXSAVE.contains(&f.name))
        {
            continue;
        }
        let Some(word) = linux_cap_word(f.leaf, f.subleaf, f.reg) else {
            out.not_cleared.push(f.name);
            continue;
        };
        let number = (word * 32 + u32::from(f.bit)).to_string();
        let sep = usize::from(!value.is_empty());
        if value.len() + sep + number.len() > CLEARCPUID_MAX_LEN {
            out.not_cleared.push(f.name);
            continue;
        }
        if sep == 1 {
            value.push(',');
        }
        value.push_str(&number);
    }
    if !value.is_empty() {
        words.push(format!("clearcpuid={value}"));
    }
    out.args = words.join(" ");
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bit, filtered, get, host, named};
    use super::super::HostKind;
    use super::*;

    #[test]
    fn pvm_hides_the_table_clears_xsave_and_sets_intel_vendor() {
        let c = filtered(b"AuthenticAMD", 0, 2, HostKind::Pvm);
        for f in PVM_HIDDEN {
            assert!(!bit(&c, f), "{} still visible", f.name);
        }
        for name in ["popcnt", "xsave", "avx", "smap", "smep", "abm", "fsgsbase"] {
            assert!(!bit(&c, &named(name)), "{name}");
        }
        assert!(c
            .as_slice()
            .iter()
            .filter(|e| e.function == 0xd)
            .all(|e| [e.eax, e.ebx, e.ecx, e.edx] == [0; 4]));
        let v = get(&c, 0, 0);
        assert_eq!([v.ebx, v.edx, v.ecx], INTEL_VENDOR);
        assert_eq!(v.eax, 0x1f, "max leaf kept");
        // Baseline features and what KVM emulates stay.
        let l1 = get(&c, 1, 0);
        assert_ne!(l1.edx & (1 << 26), 0, "sse2");
        assert_ne!(l1.ecx & (1 << 13), 0, "cx16");
        assert_ne!(l1.ecx & (1 << 21), 0, "x2apic");
        assert_ne!(l1.ecx & (1 << 24), 0, "tsc-deadline");
        // Intel vendor now: AMD topology leaf left alone.
        assert_eq!(get(&c, 0x8000_001e, 0).eax, 0);
    }

    #[test]
    fn visible_hidden_features_lists_what_is_still_set() {
        let c = filtered(b"GenuineIntel", 0, 1, HostKind::Pvm);
        assert!(visible_pvm_hidden_features(&c).is_empty());
        let mut c = c;
        for e in c.as_mut_slice() {
            if e.function == 1 {
                e.ecx |= 1 << 23;
            }
            if e.function == 7 && e.index == 0 {
                e.ebx |= 1 << 20;
            }
        }
        assert_eq!(visible_pvm_hidden_features(&c), vec!["popcnt", "smap"]);
        assert_eq!(
            visible_pvm_hidden_features(&host(b"GenuineIntel")).len(),
            PVM_HIDDEN.len()
        );
    }

    #[test]
    fn hidden_table_is_consistent() {
        let names = hidden_features_on_pvm();
        assert_eq!(names.len(), PVM_HIDDEN.len());
        for (i, f) in PVM_HIDDEN.iter().enumerate() {
            assert_eq!(names[i], f.name);
            assert!(f.bit < 32);
            for g in &PVM_HIDDEN[i + 1..] {
                assert_ne!(f.name, g.name);
                assert!(
                    (f.leaf, f.subleaf, f.reg, f.bit) != (g.leaf, g.subleaf, g.reg, g.bit),
                    "{} and {} share a bit",
                    f.name,
                    g.name
                );
            }
        }
        for name in ["xsave", "popcnt", "avx", "smap", "erms", "rdtscp"] {
            assert!(names.contains(&name), "{name}");
        }
        assert!(!names.contains(&"x2apic"));
    }

    #[test]
    fn kernel_args_clear_what_is_visible_by_bit_number() {
        // Nothing visible: nothing to add.
        let c = filtered(b"GenuineIntel", 0, 1, HostKind::Pvm);
        assert_eq!(pvm_guest_kernel_args(&c), PvmKernelArgs::default());
        // popcnt (4*32+23), smap (9*32+20), rdtscp (1*32+27) and xsave + avx visible.
        let mut c = c;
        for e in c.as_mut_slice() {
            match (e.function, e.index) {
                (1, 0) => e.ecx |= (1 << 23) | (1 << 26) | (1 << 28),
                (7, 0) => e.ebx |= 1 << 20,
                (0x8000_0001, 0) => e.edx |= 1 << 27,
                _ => {}
            }
        }
        let args = pvm_guest_kernel_args(&c);
        assert_eq!(args.args, "noxsave clearcpuid=151,308,59");
        assert!(args.not_cleared.is_empty());
    }

    #[test]
    fn kernel_args_respect_the_clearcpuid_length_limit() {
        let args = pvm_guest_kernel_args(&host(b"GenuineIntel"));
        let value = args.args.split("clearcpuid=").nth(1).unwrap();
        assert!(value.len() <= CLEARCPUID_MAX_LEN, "{}", value.len());
        assert!(args.args.starts_with("noxsave "));
        assert!(!args.not_cleared.is_empty(), "the whole table cannot fit");
        assert!(value.split(',').all(|n| n.parse::<u32>().is_ok()));
        // Table order: the leaf 1 features come first and made it in.
        assert!(value.starts_with("128,129,131,"), "{value}"); // pni, pclmulqdq, monitor
    }

    #[test]
    fn every_hidden_feature_maps_to_a_linux_bit() {
        for f in PVM_HIDDEN {
            assert!(
                linux_cap_word(f.leaf, f.subleaf, f.reg).is_some(),
                "{}",
                f.name
            );
        }
    }
}
