//! One vCPU's state as a snapshot holds it: the KVM structures (`kvm_regs`, `kvm_sregs`,
//! `kvm_fpu`, `kvm_vcpu_events`, and the LAPIC with an in-kernel irqchip) as hex of their bytes,
//! the MP state, the MSRs KVM lists that the VMM sets or a guest may change, and the CPUID
//! features the guest saw (compared on restore). Captured on the vCPU's own thread while it is
//! parked; applied before a restored vCPU first runs.
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::msr;

/// MSRs a snapshot carries (those KVM does not list on a host are left out).
const SAVED_MSRS: &[u32] = &[
    msr::MSR_IA32_TSC,
    msr::MSR_IA32_SYSENTER_CS,
    msr::MSR_IA32_SYSENTER_ESP,
    msr::MSR_IA32_SYSENTER_EIP,
    msr::MSR_IA32_MISC_ENABLE,
    msr::MSR_MTRR_DEF_TYPE,
    0x277, // IA32_PAT
    0x6e0, // IA32_TSC_DEADLINE
    msr::MSR_STAR,
    msr::MSR_LSTAR,
    msr::MSR_CSTAR,
    msr::MSR_SYSCALL_MASK,
    msr::MSR_KERNEL_GS_BASE,
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // KVM wall clock (new)
    0x4b56_4d01, // KVM system time (new)
    0x4b56_4d02, // KVM async PF
    0x4b56_4d03, // KVM steal time
    0x4b56_4d04, // KVM PV EOI
];

/// CPUID leaves whose feature registers are compared on restore: (leaf, subleaf).
pub const FEATURE_LEAVES: &[(u32, u32)] = &[(1, 0), (7, 0), (0x8000_0001, 0)];

/// A vCPU's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// `kvm_regs`, hex.
    pub regs: String,
    /// `kvm_sregs`, hex.
    pub sregs: String,
    /// `kvm_fpu`, hex.
    pub fpu: String,
    /// `kvm_vcpu_events`, hex.
    pub events: String,
    /// `kvm_lapic_state`, hex (VMs with an in-kernel irqchip).
    #[serde(default)]
    pub lapic: Option<String>,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: u32,
    /// (index, value) of the saved MSRs.
    pub msrs: Vec<(u32, u64)>,
    /// Per [`FEATURE_LEAVES`] entry: eax, ebx, ecx, edx the guest saw.
    pub cpuid: Vec<[u32; 4]>,
}

/// Hex of a plain KVM structure's bytes.
fn to_hex<T: Copy>(value: &T) -> String {
    // SAFETY: `T` is a plain-old-data KVM structure (integers and arrays of them); its bytes are
    // read within its size.
    let bytes = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A plain KVM structure from hex of exactly its size.
fn from_hex<T: Copy + Default>(text: &str, what: &str) -> Result<T, String> {
    let size = std::mem::size_of::<T>();
    if text.len() != size * 2 {
        return Err(format!(
            "{what}: {} hex digits, expected {}",
            text.len(),
            size * 2
        ));
    }
    let mut value = T::default();
    // SAFETY: as in `to_hex`; every bit pattern is a valid value of these integer-only structures,
    // and the writes stay within `size` bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut((&mut value as *mut T).cast::<u8>(), size) };
    for (i, byte) in bytes.iter_mut().enumerate() {
        let pair = text
            .get(i * 2..i * 2 + 2)
            .ok_or_else(|| format!("{what}: not hex"))?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| format!("{what}: not hex"))?;
    }
    Ok(value)
}

/// Checks that every hex field has the size of its structure (the state file's parser).
pub fn validate(state: &VcpuState, index: usize) -> Result<(), String> {
    let what = |f: &str| format!("vCPU {index} {f}");
    from_hex::<kvm_regs>(&state.regs, &what("regs"))?;
    from_hex::<kvm_sregs>(&state.sregs, &what("sregs"))?;
    from_hex::<kvm_fpu>(&state.fpu, &what("fpu"))?;
    from_hex::<kvm_vcpu_events>(&state.events, &what("events"))?;
    if let Some(l) = &state.lapic {
        from_hex::<kvm_lapic_state>(l, &what("lapic"))?;
    }
    if state.msrs.len() > 256 {
        return Err(what("msrs: too many"));
    }
    if state.cpuid.len() != FEATURE_LEAVES.len() {
        return Err(what("cpuid: wrong number of leaves"));
    }
    Ok(())
}

/// The features the guest on `fd` sees, per [`FEATURE_LEAVES`].
pub fn guest_cpuid(fd: &VcpuFd) -> Result<Vec<[u32; 4]>, String> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_CPUID2: {e}"))?;
    Ok(FEATURE_LEAVES
        .iter()
        .map(|&(leaf, sub)| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == leaf && e.index == sub)
                .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
        })
        .collect())
}

/// Reads the state of the vCPU on `fd` (its thread, parked).
pub fn capture(fd: &VcpuFd, irqchip: bool, msr_list: &[u32]) -> Result<VcpuState, String> {
    let regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sregs = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let fpu = fd.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
    let events = fd
        .get_vcpu_events()
        .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
    let mp_state = fd
        .get_mp_state()
        .map_err(|e| format!("KVM_GET_MP_STATE: {e}"))?
        .mp_state;
    let lapic = if irqchip {
        Some(to_hex(
            &fd.get_lapic().map_err(|e| format!("KVM_GET_LAPIC: {e}"))?,
        ))
    } else {
        None
    };
    let wanted: Vec<kvm_msr_entry> = SAVED_MSRS
        .iter()
        .filter(|i| msr_list.contains(i))
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&wanted).map_err(|e| format!("MSR list: {e:?}"))?;
    let read = fd
        .get_msrs(&mut msrs)
        .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
    let msrs = msrs
        .as_slice()
        .iter()
        .take(read)
        .map(|e| (e.index, e.data))
        .collect();
    Ok(VcpuState {
        regs: to_hex(&regs),
        sregs: to_hex(&sregs),
        fpu: to_hex(&fpu),
        events: to_hex(&events),
        lapic,
        mp_state,
        msrs,
        cpuid: guest_cpuid(fd)?,
    })
}

/// Writes `state` into the (not yet running) vCPU on `fd`.
pub fn apply(fd: &VcpuFd, state: &VcpuState) -> Result<(), String> {
    let sregs: kvm_sregs = from_hex(&state.sregs, "sregs")?;
    fd.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    if let Some(l) = &state.lapic {
        let lapic: kvm_lapic_state = from_hex(l, "lapic")?;
        fd.set_lapic(&lapic)
            .map_err(|e| format!("KVM_SET_LAPIC: {e}"))?;
    }
    let regs: kvm_regs = from_hex(&state.regs, "regs")?;
    fd.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let fpu: kvm_fpu = from_hex(&state.fpu, "fpu")?;
    fd.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
    let written = fd
        .set_msrs(&msrs)
        .map_err(|e| format!("KVM_SET_MSRS: {e}"))?;
    if written != entries.len() {
        let refused = entries.get(written).map_or(0, |e| e.index);
        return Err(format!("KVM_SET_MSRS refused MSR {refused:#x}"));
    }
    fd.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(|e| format!("KVM_SET_MP_STATE: {e}"))?;
    let events: kvm_vcpu_events = from_hex(&state.events, "events")?;
    fd.set_vcpu_events(&events)
        .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
    Ok(())
}

/// What CPUID features the snapshot's guest saw that `now` lacks, as one line; `None` if none.
pub fn missing_features(saved: &[[u32; 4]], now: &[[u32; 4]]) -> Option<String> {
    let regs = ["eax", "ebx", "ecx", "edx"];
    let mut missing = Vec::new();
    for (((leaf, sub), s), n) in FEATURE_LEAVES.iter().zip(saved).zip(now) {
        // eax of these leaves is a version/limit word, leaf 1's ebx APIC id and sizes; bits
        // that follow the guest's own state (OSXSAVE, APIC enabled, OSPKE) are not features.
        let dynamic: [u32; 4] = match leaf {
            1 => [!0, !0, 1 << 27, 1 << 9],
            7 => [!0, 0, 1 << 4, 0],
            _ => [!0, 0, 0, 0],
        };
        for r in 1..4 {
            let lost = s[r] & !n[r] & !dynamic[r];
            if lost != 0 {
                missing.push(format!("leaf {leaf:#x}.{sub} {} bits {lost:#x}", regs[r]));
            }
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_features_a_host_lacks_and_ignores_guest_state_bits() {
        let saved = vec![
            [0, 0, 1 << 27 | 1 << 0, 1 << 9 | 1 << 4],
            [0, 1 << 3, 1 << 4, 0],
            [0; 4],
        ];
        let same = saved.clone();
        assert_eq!(missing_features(&saved, &same), None);
        // OSXSAVE, APIC and OSPKE follow the guest's own state: not a host difference.
        let fresh = vec![[0, 0, 1, 1 << 4], [0, 1 << 3, 0, 0], [0; 4]];
        assert_eq!(missing_features(&saved, &fresh), None);
        let lacking = vec![[0, 0, 1, 1 << 4], [0, 0, 0, 0], [0; 4]];
        let line = missing_features(&saved, &lacking).expect("differs");
        assert_eq!(line, "leaf 0x7.0 ebx bits 0x8");
    }

    #[test]
    fn hex_round_trips_and_refuses_wrong_sizes() {
        let regs = kvm_regs {
            rip: 0x1234_5678,
            ..Default::default()
        };
        let hex = to_hex(&regs);
        let back: kvm_regs = from_hex(&hex, "regs").expect("round trip");
        assert_eq!(back.rip, 0x1234_5678);
        assert!(from_hex::<kvm_regs>(&hex[2..], "regs").is_err());
        assert!(from_hex::<kvm_regs>(&"zz".repeat(hex.len() / 2), "regs").is_err());
    }
}
