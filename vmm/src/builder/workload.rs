//! Builds the embedded OS-less workload guest: one user-mode task per vCPU.
use std::sync::Arc;

use crate::arch::x86_64::cpuid::HostKind;
use crate::arch::x86_64::{gdt, layout, paging, regs};
use crate::devices::BusExits;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{ExitHandler, Vcpu, VmControl};
use crate::vstate::vm::Vm;
use crate::workload::{self, TaskSpec, WorkloadMonitor};

use super::{check_vcpus, configure_cpuid, BuildError, BuiltVm, Guest, MAX_VCPUS};

/// Builds the workload guest with one task (and vCPU) per spec, in `mem_bytes` of RAM or just
/// as much as the tasks need.
pub fn build(specs: Vec<TaskSpec>, mem_bytes: Option<u64>) -> Result<BuiltVm, BuildError> {
    check_vcpus(specs.len(), MAX_VCPUS.min(mirrorball_workload::MAX_TASKS))?;
    let plan = workload::layout(&specs)?;
    let ram_bytes = match mem_bytes {
        Some(given) if given < plan.ram_bytes => {
            return Err(BuildError::WorkloadMemory {
                given: given >> 20,
                needed: plan.ram_bytes.div_ceil(1 << 20),
            })
        }
        Some(given) => given,
        None => plan.ram_bytes,
    };
    let host = HostKind::detect();
    let vm = Vm::new(GuestRam::new(ram_bytes)?, false)?;
    let mem = vm.ram().memory();
    let boot = |e: &dyn std::fmt::Display| BuildError::Boot(e.to_string());
    gdt::write_gdt_and_tss(mem).map_err(|e| boot(&e))?;
    let top = vm
        .ram()
        .ranges()
        .iter()
        .map(|(s, l)| s + l)
        .max()
        .unwrap_or(0);
    let cr3 = paging::write_identity_map(
        mem,
        layout::WORKLOAD_PAGE_TABLES,
        // At least 4 GiB so the doorbell in the device hole is mapped.
        top.div_ceil(1 << 30).max(4),
        layout::WORKLOAD_MAX_PDS,
        true,
    )
    .map_err(|e| boot(&e))?;
    let entry = workload::load(mem, &plan)?;
    let control = Arc::new(VmControl::new(specs.len()).map_err(BuildError::EventFd)?);
    let exits = Arc::new(BusExits::empty());
    let monitor = Arc::new(WorkloadMonitor::new(specs.len(), exits.clone()));
    let mut vcpus = Vec::with_capacity(specs.len());
    for index in 0..specs.len() {
        let fd = vm.create_vcpu(index)?;
        configure_cpuid(&vm, &fd, index, specs.len(), host)?;
        let state = regs::EntryState::UserMode {
            rip: entry,
            rsp: workload::stack_top(index),
            arg0: index as u64,
            arg1: mirrorball_workload::PARAMS_GPA,
        };
        regs::set_entry_state(&fd, state, cr3)
            .map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        let handler: Arc<dyn ExitHandler> = monitor.clone();
        vcpus.push(Vcpu::new(index, fd, handler, control.clone(), mem.clone()));
    }
    Ok(BuiltVm {
        vm,
        vcpus,
        control,
        exits,
        guest: Guest::Workload { monitor, specs },
        host,
    })
}
