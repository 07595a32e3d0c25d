//! Initial vCPU register state for the two boot paths.
//!
//! Both start in 64-bit long mode with paging on (the VMM's identity map), so no real-mode or
//! 32-bit code runs: on an emulating host such as PVM every instruction the guest does not run
//! in kernel mode is an instruction saved.
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::gdt::{self, KERNEL_CS, KERNEL_DS, TSS_SELECTOR, USER_CS, USER_DS};
use super::layout::{BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, ZERO_PAGE_ADDR};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Where and how a vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// Linux 64-bit boot protocol: ring 0, `rsi` = zero page.
    Linux {
        /// Entry point (startup_64).
        rip: u64,
    },
    /// OS-less workload: ring 3, `rdi` = task index, `rsi` = parameter block.
    UserMode {
        /// Entry point.
        rip: u64,
        /// Initial stack pointer.
        rsp: u64,
        /// First argument (`rdi`).
        arg0: u64,
        /// Second argument (`rsi`).
        arg1: u64,
    },
}

/// General-purpose registers for `entry`.
pub fn initial_regs(entry: EntryState) -> kvm_regs {
    match entry {
        EntryState::Linux { rip } => kvm_regs {
            rip,
            rsp: BOOT_STACK_ADDR,
            rbp: BOOT_STACK_ADDR,
            rsi: ZERO_PAGE_ADDR,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        EntryState::UserMode {
            rip,
            rsp,
            arg0,
            arg1,
        } => kvm_regs {
            rip,
            rsp,
            rdi: arg0,
            rsi: arg1,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    }
}

/// Segment and control registers for `entry` with page tables at `cr3`, starting from the
/// vCPU's current `sregs`.
pub fn initial_sregs(mut sregs: kvm_sregs, entry: EntryState, cr3: u64) -> kvm_sregs {
    let (cs, ds) = match entry {
        EntryState::Linux { .. } => (KERNEL_CS, KERNEL_DS),
        EntryState::UserMode { .. } => (USER_CS, USER_DS),
    };
    sregs.cs = gdt::segment(cs);
    let data = gdt::segment(ds);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = gdt::gdt_limit();
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cr3 = cr3;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr4 = CR4_PAE;
    if matches!(entry, EntryState::UserMode { .. }) {
        // The workload is ordinary compiled code: it may use SSE.
        sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
    }
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// x87/SSE state after reset as the boot protocol expects it.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Applies registers, segments (page tables at `cr3`) and FPU state for `entry` to `vcpu`.
pub fn set_entry_state(
    vcpu: &VcpuFd,
    entry: EntryState,
    cr3: u64,
) -> Result<(), kvm_ioctls::Error> {
    let sregs = initial_sregs(vcpu.get_sregs()?, entry, cr3);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&initial_regs(entry))?;
    vcpu.set_fpu(&initial_fpu())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_entry_follows_boot_protocol() {
        let regs = initial_regs(EntryState::Linux { rip: 0x100_0200 });
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0200, ZERO_PAGE_ADDR, 2)
        );
        let s = initial_sregs(kvm_sregs::default(), EntryState::Linux { rip: 0 }, 0xa0000);
        assert_eq!(
            (s.cs.selector, s.ds.selector, s.ss.selector),
            (0x10, 0x18, 0x18)
        );
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!((s.cs.dpl, s.cr3), (0, 0xa0000));
    }

    #[test]
    fn user_entry_is_ring3() {
        let e = EntryState::UserMode {
            rip: 0x20_0000,
            rsp: 0x10_4000,
            arg0: 2,
            arg1: 0x1_0000,
        };
        let r = initial_regs(e);
        assert_eq!((r.rdi, r.rsi, r.rsp), (2, 0x1_0000, 0x10_4000));
        assert_eq!(r.rflags, RFLAGS_RESERVED, "interrupts off");
        let s = initial_sregs(kvm_sregs::default(), e, 0x40000);
        assert_eq!((s.cs.dpl, s.ss.dpl, s.cs.selector & 3), (3, 3, 3));
        assert_ne!(s.cr4 & CR4_OSFXSR, 0);
    }
}
