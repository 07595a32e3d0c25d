//! One vCPU's state as a snapshot holds it: the KVM structures (`kvm_regs`, `kvm_sregs`,
//! `kvm_fpu`, XSAVE and XCRs where KVM has them, `kvm_debugregs`, `kvm_vcpu_events`, and the
//! LAPIC with an in-kernel irqchip) as hex of their bytes, the MP state, every MSR KVM lists
//! (`KVM_GET_MSR_INDEX_LIST`) that it lets the VMM read, the TSC frequency and the CPUID
//! features the guest saw (compared on restore). Captured on the vCPU's own thread while it is
//! parked; applied before a restored vCPU first runs, in the order KVM needs: special registers
//! (modes, EFER, APIC base) first, then registers and FPU/XSAVE, the LAPIC, the MSRs (the TSC
//! before the TSC deadline, which the LAPIC must already be in deadline mode to take), debug
//! registers, the MP state and last the pending events.
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// The TSC deadline MSR: written after every other MSR (the TSC first, the LAPIC already set).
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// KVM's async page fault enable MSR: written after its interrupt vector MSR (as QEMU does).
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// Most MSRs a state may carry.
const MAX_MSRS: usize = 1024;

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
    /// `kvm_xsave`, hex (hosts with XSAVE; it supersedes `fpu`).
    #[serde(default)]
    pub xsave: Option<String>,
    /// `kvm_xcrs`, hex (hosts with XSAVE).
    #[serde(default)]
    pub xcrs: Option<String>,
    /// `kvm_debugregs`, hex.
    pub debugregs: String,
    /// `kvm_vcpu_events`, hex.
    pub events: String,
    /// `kvm_lapic_state`, hex (VMs with an in-kernel irqchip).
    #[serde(default)]
    pub lapic: Option<String>,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: u32,
    /// (index, value) of the saved MSRs.
    pub msrs: Vec<(u32, u64)>,
    /// The vCPU's TSC frequency, kHz (`None`: KVM does not say).
    #[serde(default)]
    pub tsc_khz: Option<u32>,
    /// Per [`FEATURE_LEAVES`] entry: eax, ebx, ecx, edx the guest saw.
    pub cpuid: Vec<[u32; 4]>,
}

/// Hex of a plain KVM structure's bytes.
pub(crate) fn to_hex<T: Copy>(value: &T) -> String {
    // SAFETY: `T` is a plain-old-data KVM structure (integers and arrays of them); its bytes are
    // read within its size.
    let bytes = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A plain KVM structure from hex of exactly its size.
pub(crate) fn from_hex<T: Copy + Default>(text: &str, what: &str) -> Result<T, String> {
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

/// A `kvm_xsave` from hex of its 4 KiB region.
fn xsave_from_hex(text: &str, what: &str) -> Result<kvm_xsave, String> {
    let mut xsave = kvm_xsave::default();
    let words = xsave.region.len();
    let size = words * 4;
    if text.len() != size * 2 {
        return Err(format!(
            "{what}: {} hex digits, expected {}",
            text.len(),
            size * 2
        ));
    }
    for (i, word) in xsave.region.iter_mut().enumerate() {
        let hex = text
            .get(i * 8..i * 8 + 8)
            .ok_or_else(|| format!("{what}: not hex"))?;
        let mut bytes = [0u8; 4];
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(j * 2..j * 2 + 2).unwrap_or("zz"), 16)
                .map_err(|_| format!("{what}: not hex"))?;
        }
        *word = u32::from_ne_bytes(bytes);
    }
    Ok(xsave)
}

/// Checks that every hex field has the size of its structure (the state file's parser).
pub fn validate(state: &VcpuState, index: usize) -> Result<(), String> {
    let what = |f: &str| format!("vCPU {index} {f}");
    from_hex::<kvm_regs>(&state.regs, &what("regs"))?;
    from_hex::<kvm_sregs>(&state.sregs, &what("sregs"))?;
    from_hex::<kvm_fpu>(&state.fpu, &what("fpu"))?;
    from_hex::<kvm_vcpu_events>(&state.events, &what("events"))?;
    from_hex::<kvm_debugregs>(&state.debugregs, &what("debugregs"))?;
    if let Some(l) = &state.lapic {
        from_hex::<kvm_lapic_state>(l, &what("lapic"))?;
    }
    if let Some(x) = &state.xsave {
        xsave_from_hex(x, &what("xsave"))?;
    }
    if let Some(x) = &state.xcrs {
        from_hex::<kvm_xcrs>(x, &what("xcrs"))?;
    }
    if state.msrs.len() > MAX_MSRS {
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

/// Reads the MSRs of `list` that KVM lets the VMM read (`KVM_GET_MSRS` stops at the first it
/// refuses: that one is left out and the rest read on).
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::with_capacity(list.len());
    let mut at = 0;
    while at < list.len() {
        let chunk: Vec<kvm_msr_entry> = list[at..]
            .iter()
            .take(MAX_MSRS)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|e| format!("MSR list: {e:?}"))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
        out.extend(msrs.as_slice().iter().take(read).map(|e| (e.index, e.data)));
        // The entry after the ones read is one KVM refused (or the chunk ended).
        at += read + usize::from(read < chunk.len());
    }
    Ok(out)
}

/// Reads the state of the vCPU on `fd` (its thread, parked); `msr_list` is what
/// `KVM_GET_MSR_INDEX_LIST` reported.
pub fn capture(fd: &VcpuFd, irqchip: bool, msr_list: &[u32]) -> Result<VcpuState, String> {
    let regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sregs = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let fpu = fd.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
    // Without XSAVE on the host (or with state beyond 4 KiB) the FPU state alone is kept.
    let xsave = fd.get_xsave().ok().map(|x| to_hex(&x.region));
    let xcrs = fd.get_xcrs().ok().map(|x| to_hex(&x));
    let debugregs = fd
        .get_debug_regs()
        .map_err(|e| format!("KVM_GET_DEBUGREGS: {e}"))?;
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
    Ok(VcpuState {
        regs: to_hex(&regs),
        sregs: to_hex(&sregs),
        fpu: to_hex(&fpu),
        xsave,
        xcrs,
        debugregs: to_hex(&debugregs),
        events: to_hex(&events),
        lapic,
        mp_state,
        msrs: read_msrs(fd, msr_list)?,
        tsc_khz: fd.get_tsc_khz().ok(),
        cpuid: guest_cpuid(fd)?,
    })
}

/// Writes `msrs` (the TSC deadline last, async page faults' enable just before it), naming the first one KVM refuses. One it refuses but
/// that already reads the saved value on the new vCPU (one the guest never changed: KVM may
/// list MSRs its guest CPUID does not expose and refuse writes to them) is left as it is.
fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), String> {
    let mut entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    entries.sort_by_key(|e| (e.index == MSR_TSC_DEADLINE, e.index == MSR_KVM_ASYNC_PF_EN));
    let mut at = 0;
    while at < entries.len() {
        let list = Msrs::from_entries(&entries[at..]).map_err(|e| format!("MSR list: {e:?}"))?;
        let written = fd
            .set_msrs(&list)
            .map_err(|e| format!("KVM_SET_MSRS: {e}"))?;
        at += written;
        let Some(refused) = entries.get(at) else {
            break;
        };
        let unchanged = read_msrs(fd, &[refused.index])
            .ok()
            .and_then(|now| now.first().copied())
            .is_some_and(|(_, value)| value == refused.data);
        if !unchanged {
            return Err(format!(
                "this host's KVM refuses MSR {:#x} = {:#x} the snapshot's guest had",
                refused.index, refused.data
            ));
        }
        at += 1;
    }
    Ok(())
}

/// Writes `state` into the (not yet running) vCPU on `fd`.
pub fn apply(fd: &VcpuFd, state: &VcpuState) -> Result<(), String> {
    if let (Some(saved), Ok(now)) = (state.tsc_khz, fd.get_tsc_khz()) {
        // A guest calibrated its clocks on the saved frequency: make the vCPU's TSC tick at it.
        if saved != now {
            fd.set_tsc_khz(saved).map_err(|e| {
                format!("the snapshot's TSC runs at {saved} kHz, this host's at {now} kHz and KVM cannot scale it ({e})")
            })?;
        }
    }
    let sregs: kvm_sregs = from_hex(&state.sregs, "sregs")?;
    fd.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs: kvm_regs = from_hex(&state.regs, "regs")?;
    fd.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let fpu: kvm_fpu = from_hex(&state.fpu, "fpu")?;
    fd.set_fpu(&fpu).map_err(|e| format!("KVM_SET_FPU: {e}"))?;
    if let Some(x) = &state.xsave {
        let xsave = xsave_from_hex(x, "xsave")?;
        // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB, the legacy layout KVM_GET_XSAVE gave);
        // KVM reads no more than its size.
        unsafe { fd.set_xsave(&xsave) }.map_err(|e| format!("KVM_SET_XSAVE: {e}"))?;
    }
    if let Some(x) = &state.xcrs {
        let xcrs: kvm_xcrs = from_hex(x, "xcrs")?;
        fd.set_xcrs(&xcrs)
            .map_err(|e| format!("KVM_SET_XCRS: {e}"))?;
    }
    if let Some(l) = &state.lapic {
        let lapic: kvm_lapic_state = from_hex(l, "lapic")?;
        fd.set_lapic(&lapic)
            .map_err(|e| format!("KVM_SET_LAPIC: {e}"))?;
    }
    write_msrs(fd, &state.msrs)?;
    let debugregs: kvm_debugregs = from_hex(&state.debugregs, "debugregs")?;
    fd.set_debug_regs(&debugregs)
        .map_err(|e| format!("KVM_SET_DEBUGREGS: {e}"))?;
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
