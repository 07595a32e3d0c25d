//! The processor brand string (CPUID 0x80000002–0x80000004), which Linux prints as `model name`.
//!
//! KVM's supported table may leave these leaves zero (an empty `model name` in the guest's
//! `/proc/cpuinfo`), or leave them out. [`fill_brand_string`] keeps a brand KVM already gives,
//! and otherwise writes the host processor's brand (read with the `cpuid` instruction) or, when
//! the host has none either, [`FALLBACK_BRAND`]; it raises the maximum extended leaf
//! (0x80000000 EAX) to 0x80000004 when needed.
use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::CpuidError;

/// Brand of a vCPU whose host reports none.
pub const FALLBACK_BRAND: &str = "Mirrorball virtual CPU";

const LEAF_EXT_MAX: u32 = 0x8000_0000;
const LEAF_BRAND: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];

/// The 48 brand bytes of a table (zeros where leaves are missing).
pub fn brand_bytes(cpuid: &CpuId) -> [u8; 48] {
    let mut out = [0u8; 48];
    for (i, leaf) in LEAF_BRAND.iter().enumerate() {
        if let Some(e) = cpuid.as_slice().iter().find(|e| e.function == *leaf) {
            for (j, r) in [e.eax, e.ebx, e.ecx, e.edx].iter().enumerate() {
                out[i * 16 + j * 4..i * 16 + j * 4 + 4].copy_from_slice(&r.to_le_bytes());
            }
        }
    }
    out
}

/// The brand as text: up to the first NUL, trimmed.
pub fn brand_text(bytes: &[u8; 48]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_string()
}

/// The host processor's brand bytes, as its own `cpuid` reports them.
/// The host's brand string, read once per process: `cpuid` traps to the hypervisor when the
/// host is itself a VM, and every vCPU of every VM asks.
fn host_brand() -> [u8; 48] {
    static BRAND: std::sync::OnceLock<[u8; 48]> = std::sync::OnceLock::new();
    *BRAND.get_or_init(read_host_brand)
}

fn read_host_brand() -> [u8; 48] {
    let mut out = [0u8; 48];
    // `cpuid` exists on every x86-64 processor; leaf 0x80000000 is always valid.
    let max = std::arch::x86_64::__cpuid(LEAF_EXT_MAX).eax;
    if max < LEAF_BRAND[2] {
        return out;
    }
    for (i, leaf) in LEAF_BRAND.iter().enumerate() {
        let r = std::arch::x86_64::__cpuid(*leaf);
        for (j, v) in [r.eax, r.ebx, r.ecx, r.edx].iter().enumerate() {
            out[i * 16 + j * 4..i * 16 + j * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Makes the brand leaves of `cpuid` non-empty (see the module docs).
pub fn fill_brand_string(cpuid: &mut CpuId) -> Result<(), CpuidError> {
    if !brand_text(&brand_bytes(cpuid)).is_empty() {
        return Ok(());
    }
    let host = host_brand();
    let brand = if brand_text(&host).is_empty() {
        let mut b = [0u8; 48];
        b[..FALLBACK_BRAND.len()].copy_from_slice(FALLBACK_BRAND.as_bytes());
        b
    } else {
        host
    };
    fill_brand_from(cpuid, &brand)
}

/// [`fill_brand_string`] with a given brand (48 bytes, NUL-padded).
pub fn fill_brand_from(cpuid: &mut CpuId, brand: &[u8; 48]) -> Result<(), CpuidError> {
    if !brand_text(&brand_bytes(cpuid)).is_empty() {
        return Ok(());
    }
    let word = |i: usize| u32::from_le_bytes([brand[i], brand[i + 1], brand[i + 2], brand[i + 3]]);
    for (i, leaf) in LEAF_BRAND.iter().enumerate() {
        let base = i * 16;
        let regs = [word(base), word(base + 4), word(base + 8), word(base + 12)];
        match cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == *leaf)
        {
            Some(e) => [e.eax, e.ebx, e.ecx, e.edx] = regs,
            None => {
                let e = kvm_cpuid_entry2 {
                    function: *leaf,
                    eax: regs[0],
                    ebx: regs[1],
                    ecx: regs[2],
                    edx: regs[3],
                    ..Default::default()
                };
                cpuid.push(e).map_err(|source| CpuidError::TooManyEntries {
                    leaf: *leaf,
                    source,
                })?;
            }
        }
    }
    match cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == LEAF_EXT_MAX)
    {
        Some(e) => e.eax = e.eax.max(LEAF_BRAND[2]),
        None => {
            let e = kvm_cpuid_entry2 {
                function: LEAF_EXT_MAX,
                eax: LEAF_BRAND[2],
                ..Default::default()
            };
            cpuid.push(e).map_err(|source| CpuidError::TooManyEntries {
                leaf: LEAF_EXT_MAX,
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn padded(s: &str) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..s.len()].copy_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn zero_brand_leaves_get_the_brand() {
        let mut c = CpuId::from_entries(&[
            leaf(0x8000_0000, [0x8000_0008, 0, 0, 0]),
            leaf(0x8000_0002, [0; 4]),
            leaf(0x8000_0003, [0; 4]),
            leaf(0x8000_0004, [0; 4]),
        ])
        .unwrap();
        let brand = "AMD EPYC Processor with a name over thirty-two b";
        fill_brand_from(&mut c, &padded(&brand[..48])).unwrap();
        assert_eq!(brand_text(&brand_bytes(&c)), brand[..48].trim());
        // The maximum extended leaf is not lowered.
        let max = c.as_slice().iter().find(|e| e.function == 0x8000_0000);
        assert_eq!(max.map(|e| e.eax), Some(0x8000_0008));
    }

    #[test]
    fn missing_leaves_are_added_and_the_maximum_raised() {
        let mut c = CpuId::from_entries(&[leaf(0x8000_0000, [0x8000_0001, 0, 0, 0])]).unwrap();
        fill_brand_from(&mut c, &padded(FALLBACK_BRAND)).unwrap();
        assert_eq!(brand_text(&brand_bytes(&c)), FALLBACK_BRAND);
        let max = c.as_slice().iter().find(|e| e.function == 0x8000_0000);
        assert_eq!(max.map(|e| e.eax), Some(0x8000_0004));
    }

    #[test]
    fn a_brand_kvm_gives_is_kept() {
        let b = padded("Some CPU");
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut c = CpuId::from_entries(&[
            leaf(0x8000_0000, [0x8000_0004, 0, 0, 0]),
            leaf(0x8000_0002, [w(0), w(4), w(8), w(12)]),
            leaf(0x8000_0003, [0; 4]),
            leaf(0x8000_0004, [0; 4]),
        ])
        .unwrap();
        fill_brand_from(&mut c, &padded("Other")).unwrap();
        assert_eq!(brand_text(&brand_bytes(&c)), "Some CPU");
    }

    #[test]
    fn the_filled_brand_is_never_empty() {
        let mut c = CpuId::from_entries(&[leaf(0, [0x1f, 0, 0, 0])]).unwrap();
        fill_brand_string(&mut c).unwrap();
        assert!(!brand_text(&brand_bytes(&c)).is_empty());
    }
}
