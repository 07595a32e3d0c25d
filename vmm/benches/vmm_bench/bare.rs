//! The baseline: a bare VM driven through kvm-ioctls directly, with nothing of the VMM in it.
//!
//! One anonymous memory mapping as the only memslot, one vCPU put straight into 64-bit mode at
//! ring 0 (GDT, TSS, identity page tables for 4 GiB with 2 MiB pages, control registers), no
//! in-kernel irqchip, no CPUID setup, no devices, no threads: `KVM_RUN` in a loop on the calling
//! thread. It runs the same code as the VMM guests (see `guest`), entered at the same address.
use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::guest::{CODE_ADDR, I8042_COMMAND_PORT, I8042_RESET};

const GDT_ADDR: u64 = 0x500;
const TSS_ADDR: u64 = 0x600;
const STACK_TOP: u64 = 0x8000;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;

/// Exits seen by [`BareVm::run_to_reset`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// `out` exits other than the final reset.
    pub pio: u64,
    /// MMIO write exits.
    pub mmio: u64,
}

/// Anonymous memory, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: a fresh private anonymous mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of guest memory");
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        let start = usize::try_from(addr)?;
        if start
            .checked_add(data.len())
            .is_none_or(|end| end > self.len)
        {
            bail!(
                "guest write at {addr:#x} of {} bytes is out of range",
                data.len()
            );
        }
        // SAFETY: the range was checked to lie inside the mapping, which this struct owns; `data`
        // cannot overlap it (it is not handed out anywhere).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(start), data.len()) };
        Ok(())
    }

    fn write_u64(&mut self, addr: u64, value: u64) -> Result<()> {
        self.write(addr, &value.to_le_bytes())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping created in `new`; nothing uses it any more
        // (the VM that had it as a memslot is dropped first, see `BareVm`'s field order).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A bare VM with one vCPU ready to run at [`CODE_ADDR`].
pub struct BareVm {
    // Field order = drop order: the vCPU and VM fds close before the memory is unmapped.
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    _mem: Mapping,
}

/// Whether and when a bare VM gets the in-kernel irqchip and PIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Irqchip {
    /// Neither: the baseline.
    None,
    /// `KVM_CREATE_IRQCHIP` + `KVM_CREATE_PIT2` before the memslot, in the VMM's order.
    BeforeMemslot,
    /// The same after the memslot.
    AfterMemslot,
}

fn create_irqchip(vm: &VmFd) -> Result<()> {
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    let pit = kvm_bindings::kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).context("KVM_CREATE_PIT2")
}

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl BareVm {
    /// Creates the VM with `mem_bytes` of RAM holding `code` at [`CODE_ADDR`].
    pub fn new(mem_bytes: usize, code: &[u8]) -> Result<Self> {
        Self::with_irqchip(mem_bytes, code, Irqchip::None)
    }

    /// Like [`BareVm::new`], with the in-kernel interrupt controllers and PIT the VMM creates
    /// for Linux guests, created before or after the memslot (to show what they cost here).
    pub fn with_irqchip(mem_bytes: usize, code: &[u8], irqchip: Irqchip) -> Result<Self> {
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        if irqchip == Irqchip::BeforeMemslot {
            create_irqchip(&vm)?;
        }
        let mut mem = Mapping::new(mem_bytes)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes as u64,
            userspace_addr: mem.ptr as u64,
        };
        // SAFETY: the region is a live mapping of `mem_bytes` owned by the returned BareVm, which
        // closes the VM fd before unmapping it.
        unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        if irqchip == Irqchip::AfterMemslot {
            create_irqchip(&vm)?;
        }

        // GDT: null, null, 64-bit code (0x10), data (0x18), 64-bit TSS (0x20, 16 bytes).
        let tss_lo = 0x67 | ((TSS_ADDR & 0xff_ffff) << 16) | (0x8b << 40);
        for (i, entry) in [
            0,
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            tss_lo,
            0,
        ]
        .into_iter()
        .enumerate()
        {
            mem.write_u64(GDT_ADDR + 8 * i as u64, entry)?;
        }
        // Identity map of 4 GiB: PML4 → PDPT → 4 page directories of 2 MiB pages.
        const PRESENT_RW: u64 = 0x3;
        const HUGE: u64 = 0x80;
        mem.write_u64(PML4_ADDR, PDPT_ADDR | PRESENT_RW)?;
        for gib in 0..4u64 {
            let pd = PD_ADDR + gib * 0x1000;
            mem.write_u64(PDPT_ADDR + gib * 8, pd | PRESENT_RW)?;
            let table: Vec<u8> = (0..512u64)
                .flat_map(|i| ((gib << 30) | (i << 21) | PRESENT_RW | HUGE).to_le_bytes())
                .collect();
            mem.write(pd, &table)?;
        }
        mem.write(CODE_ADDR, code)?;

        let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
        sregs.cs = segment(0x10, 0xb, true);
        let data = segment(0x18, 0x3, false);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: TSS_ADDR,
            limit: 0x67,
            selector: 0x20,
            type_: 0xb,
            present: 1,
            s: 0,
            ..Default::default()
        };
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 6 * 8 - 1;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = 0x8000_0033; // PG, NE, ET, MP, PE
        sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
        vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_ADDR,
            rsp: STACK_TOP,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
        Ok(Self {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            _mem: mem,
        })
    }

    /// Runs until the first exit and checks that it is an `out`.
    pub fn run_to_first_exit(&mut self) -> Result<()> {
        match self.vcpu.run() {
            Ok(VcpuExit::IoOut(..)) => Ok(()),
            Ok(other) => bail!("bare VM: unexpected first exit {other:?}"),
            Err(e) => bail!("bare VM: KVM_RUN failed: {e}"),
        }
    }

    /// Runs until the guest resets through the i8042, counting port-I/O and MMIO exits.
    pub fn run_to_reset(&mut self) -> Result<Counts> {
        let mut counts = Counts::default();
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if port == I8042_COMMAND_PORT && data.first() == Some(&I8042_RESET) {
                        return Ok(counts);
                    }
                    counts.pio += 1;
                }
                Ok(VcpuExit::MmioWrite(..)) => counts.mmio += 1,
                Ok(other) => bail!("bare VM: unexpected exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => bail!("bare VM: KVM_RUN failed: {e}"),
            }
        }
    }

    /// Runs until the guest halts (`hlt` exits to user space: there is no in-kernel irqchip).
    pub fn run_to_halt(&mut self) -> Result<()> {
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::Hlt) => return Ok(()),
                Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::MmioWrite(..)) => {}
                Ok(other) => bail!("bare VM: unexpected exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => bail!("bare VM: KVM_RUN failed: {e}"),
            }
        }
    }
}
