//! Local APIC boot configuration of a vCPU (in-kernel irqchip).
//!
//! This module owns the LINT0/LINT1 local vector table entries of each vCPU's local APIC:
//! [`setup_lint`] puts the local APIC in virtual-wire mode (LINT0 = ExtINT, so the legacy PIC's
//! interrupts reach the CPU before the guest programs the IOAPIC; LINT1 = NMI), which is what the
//! MP table written by [`super::mptable`] announces. It also provides bounds-checked accessors for
//! 32-bit registers inside `kvm_lapic_state::regs` (the 1 KiB APIC register page as KVM exposes it
//! through `KVM_GET_LAPIC`/`KVM_SET_LAPIC`).
//!
//! Call [`setup_lint`] after `VmFd::create_irq_chip` and after creating the vCPU; without an
//! in-kernel irqchip `KVM_GET_LAPIC` fails.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;
use thiserror::Error;

/// Offset of the LVT LINT0 register in the APIC register page.
pub const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the APIC register page.
pub const APIC_LVT_LINT1: usize = 0x360;
/// Delivery mode field (bits 10:8) value for NMI.
pub const DELIVERY_MODE_NMI: u32 = 0b100;
/// Delivery mode field (bits 10:8) value for ExtINT.
pub const DELIVERY_MODE_EXTINT: u32 = 0b111;

const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u32 = 0b111 << DELIVERY_MODE_SHIFT;
/// APIC registers sit on 16-byte boundaries of the register page.
const REG_ALIGN: usize = 16;
const REG_SIZE: usize = 4;

/// Errors from reading or writing local APIC state.
#[derive(Debug, Error)]
pub enum LapicError {
    /// `KVM_GET_LAPIC` failed (typically: no in-kernel irqchip).
    #[error("KVM_GET_LAPIC failed: {0}")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// The register offset is outside the register page or not 16-byte aligned.
    #[error("invalid local APIC register offset {offset:#x}")]
    BadOffset {
        /// The offending offset.
        offset: usize,
    },
}

fn reg_range(offset: usize) -> Result<std::ops::Range<usize>, LapicError> {
    let len = std::mem::size_of::<kvm_lapic_state>();
    match offset.checked_add(REG_SIZE) {
        Some(end) if offset.is_multiple_of(REG_ALIGN) && end <= len => Ok(offset..end),
        _ => Err(LapicError::BadOffset { offset }),
    }
}

/// Reads the 32-bit register at `offset` (a multiple of 16 below 0x400) of `state`.
pub fn get_reg(state: &kvm_lapic_state, offset: usize) -> Result<u32, LapicError> {
    let range = reg_range(offset)?;
    let mut bytes = [0u8; REG_SIZE];
    for (dst, src) in bytes.iter_mut().zip(&state.regs[range]) {
        // `regs` is declared as `c_char`; reinterpret each byte as unsigned.
        *dst = src.to_ne_bytes()[0];
    }
    Ok(u32::from_le_bytes(bytes))
}

/// Writes the 32-bit register at `offset` (a multiple of 16 below 0x400) of `state`.
pub fn set_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) -> Result<(), LapicError> {
    let range = reg_range(offset)?;
    for (dst, src) in state.regs[range].iter_mut().zip(value.to_le_bytes()) {
        *dst = std::os::raw::c_char::from_ne_bytes([src]);
    }
    Ok(())
}

/// Delivery mode field (bits 10:8) of an LVT entry.
pub fn delivery_mode(lvt: u32) -> u32 {
    (lvt & DELIVERY_MODE_MASK) >> DELIVERY_MODE_SHIFT
}

/// `lvt` with its delivery mode field replaced by `mode` (only the low 3 bits of `mode` count).
pub fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !DELIVERY_MODE_MASK) | ((mode << DELIVERY_MODE_SHIFT) & DELIVERY_MODE_MASK)
}

/// Configures LINT0 as ExtINT and LINT1 as NMI on `vcpu`'s in-kernel local APIC.
///
/// Only the delivery mode fields change; vector, mask and trigger bits keep KVM's reset values
/// (the guest OS reprograms both entries during boot anyway).
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), LapicError> {
    let mut state = vcpu.get_lapic().map_err(LapicError::GetLapic)?;
    let lint0 = get_reg(&state, APIC_LVT_LINT0)?;
    set_reg(
        &mut state,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, DELIVERY_MODE_EXTINT),
    )?;
    let lint1 = get_reg(&state, APIC_LVT_LINT1)?;
    set_reg(
        &mut state,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, DELIVERY_MODE_NMI),
    )?;
    vcpu.set_lapic(&state).map_err(LapicError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorball_profiler::testing::kvm_or_skip;

    #[test]
    fn reg_round_trip_is_little_endian() {
        let mut state = kvm_lapic_state::default();
        set_reg(&mut state, APIC_LVT_LINT0, 0x8001_0700).unwrap();
        assert_eq!(get_reg(&state, APIC_LVT_LINT0).unwrap(), 0x8001_0700);
        assert_eq!(state.regs[APIC_LVT_LINT0].to_ne_bytes()[0], 0x00);
        assert_eq!(state.regs[APIC_LVT_LINT0 + 1].to_ne_bytes()[0], 0x07);
        assert_eq!(state.regs[APIC_LVT_LINT0 + 3].to_ne_bytes()[0], 0x80);
        // Neighbouring registers are untouched.
        assert_eq!(get_reg(&state, APIC_LVT_LINT1).unwrap(), 0);
        assert_eq!(get_reg(&state, APIC_LVT_LINT0 - 16).unwrap(), 0);
    }

    #[test]
    fn offsets_are_bounds_and_alignment_checked() {
        let mut state = kvm_lapic_state::default();
        assert!(get_reg(&state, 0x3f0).is_ok());
        for bad in [0x400, 0x3fd, 0x352, usize::MAX, usize::MAX - 3] {
            assert!(matches!(
                get_reg(&state, bad),
                Err(LapicError::BadOffset { offset }) if offset == bad
            ));
            assert!(set_reg(&mut state, bad, 1).is_err());
        }
        assert!(state.regs.iter().all(|&b| b == 0));
    }

    #[test]
    fn delivery_mode_field_is_bits_10_to_8() {
        assert_eq!(delivery_mode(0x0001_0700), DELIVERY_MODE_EXTINT);
        assert_eq!(
            with_delivery_mode(0x0001_00ff, DELIVERY_MODE_NMI),
            0x0001_04ff
        );
        assert_eq!(
            with_delivery_mode(0x0001_07ff, DELIVERY_MODE_NMI),
            0x0001_04ff
        );
        assert_eq!(with_delivery_mode(0, 0xffff_ffff), 0x700);
    }

    #[test]
    fn setup_lint_on_kvm_vcpu() {
        let Some(kvm) = kvm_or_skip("setup_lint_on_kvm_vcpu") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpus: Vec<VcpuFd> = (0..2).map(|i| vm.create_vcpu(i).unwrap()).collect();
        for vcpu in &vcpus {
            setup_lint(vcpu).unwrap();
            let state = vcpu.get_lapic().unwrap();
            let lint0 = get_reg(&state, APIC_LVT_LINT0).unwrap();
            let lint1 = get_reg(&state, APIC_LVT_LINT1).unwrap();
            assert_eq!(
                delivery_mode(lint0),
                DELIVERY_MODE_EXTINT,
                "LINT0 {lint0:#x}"
            );
            assert_eq!(delivery_mode(lint1), DELIVERY_MODE_NMI, "LINT1 {lint1:#x}");
        }
    }

    #[test]
    fn setup_lint_without_irqchip_is_an_error() {
        let Some(kvm) = kvm_or_skip("setup_lint_without_irqchip_is_an_error") else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        assert!(matches!(setup_lint(&vcpu), Err(LapicError::GetLapic(_))));
    }
}
