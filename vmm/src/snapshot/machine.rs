//! The VM-wide KVM state of a guest with an in-kernel irqchip, as a snapshot holds it: the two
//! PICs and the IOAPIC (`KVM_GET_IRQCHIP`), the PIT (`KVM_GET_PIT2`) and the KVM clock
//! (`KVM_GET_CLOCK`), each as hex of its KVM structure. Read from any thread while the vCPUs
//! are parked; written into a clone after its vCPUs' state, the clock last, so the guest's
//! time goes on from where the snapshot left it.
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::vcpu::{from_hex, to_hex};

/// The chips of `KVM_GET_IRQCHIP`, in the order the state holds them.
const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "PIC master"),
    (KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
    (KVM_IRQCHIP_IOAPIC, "IOAPIC"),
];

/// In-kernel interrupt chips, PIT and clock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    /// `kvm_irqchip` of the PIC master, the PIC slave and the IOAPIC, hex.
    pub irqchips: Vec<String>,
    /// `kvm_pit_state2`, hex.
    pub pit: String,
    /// `kvm_clock_data.clock`: the KVM clock, ns.
    pub clock_ns: u64,
}

/// Checks every field's size (the state file's parser).
pub fn validate(state: &MachineState) -> Result<(), String> {
    if state.irqchips.len() != CHIPS.len() {
        return Err("machine: expected 3 interrupt chips".into());
    }
    for (hex, (_, name)) in state.irqchips.iter().zip(CHIPS) {
        from_hex::<kvm_irqchip>(hex, &format!("machine {name}"))?;
    }
    from_hex::<kvm_pit_state2>(&state.pit, "machine PIT")?;
    Ok(())
}

/// Reads the VM's chips, PIT and clock.
pub fn capture(vm: &VmFd) -> Result<MachineState, String> {
    let mut irqchips = Vec::with_capacity(CHIPS.len());
    for (chip_id, name) in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(|e| format!("KVM_GET_IRQCHIP ({name}): {e}"))?;
        irqchips.push(to_hex(&chip));
    }
    let pit = vm.get_pit2().map_err(|e| format!("KVM_GET_PIT2: {e}"))?;
    let clock = vm.get_clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))?;
    Ok(MachineState {
        irqchips,
        pit: to_hex(&pit),
        clock_ns: clock.clock,
    })
}

/// Writes the chips and the PIT into a clone's VM (before its vCPUs run).
pub fn apply_chips(vm: &VmFd, state: &MachineState) -> Result<(), String> {
    for (hex, (chip_id, name)) in state.irqchips.iter().zip(CHIPS) {
        let chip: kvm_irqchip = from_hex(hex, name)?;
        if chip.chip_id != chip_id {
            return Err(format!(
                "machine: the {name} state names chip {}",
                chip.chip_id
            ));
        }
        vm.set_irqchip(&chip)
            .map_err(|e| format!("KVM_SET_IRQCHIP ({name}): {e}"))?;
    }
    let pit: kvm_pit_state2 = from_hex(&state.pit, "PIT")?;
    vm.set_pit2(&pit)
        .map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
    Ok(())
}

/// Sets the clone's KVM clock to the snapshot's (last, once everything else is in place).
pub fn apply_clock(vm: &VmFd, state: &MachineState) -> Result<(), String> {
    let clock = kvm_clock_data {
        clock: state.clock_ns,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| format!("KVM_SET_CLOCK: {e}"))
}
