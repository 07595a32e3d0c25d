//! Hand-assembled guest code shared by the VMM runs and the bare kvm-ioctls baseline; the
//! minimal ELF wrapper the VMM's Linux boot path accepts as a "kernel" is the end-to-end tests'
//! (`tests/common/mod.rs`, included as `common`).
//!
//! All code runs in 64-bit mode, ring 0, with paging on (an identity map of the first 4 GiB), and
//! is position independent: only relative jumps; the one absolute address is the MMIO target.

/// The ELF writer and load address the end-to-end tests use (`tests/common`): an ELF64
/// executable with one PT_LOAD segment holding the code at [`CODE_ADDR`], entered there.
pub use super::common::{tiny_elf as elf, TINY_GUEST_ADDR as CODE_ADDR};

/// Unclaimed I/O port the exit loop writes to (no device of the VMM answers it).
pub const EXIT_PORT: u16 = 0x1234;

/// Guest-physical address the MMIO loop writes to: inside the 32-bit device hole, no memslot,
/// no device, but mapped by the identity page tables.
pub const MMIO_ADDR: u32 = 0xd010_0000;

/// i8042 command port; writing 0xfe to it pulses the CPU reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 "pulse reset" command.
pub const I8042_RESET: u8 = 0xfe;

/// Exits unrolled in one loop body, so that the loop's own `dec`/`jnz` (emulated at CPL0 on PVM)
/// add only 2 instructions per this many exits.
const UNROLL: u32 = 100;

/// Which exit the loop produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// `out dx, al` to [`EXIT_PORT`].
    Pio,
    /// `mov [rbx], al` with `rbx` = [`MMIO_ADDR`].
    Mmio,
}

impl ExitKind {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::Pio => "port I/O",
            ExitKind::Mmio => "MMIO",
        }
    }
}

/// `mov al, 0xfe; out 0x64, al`: the i8042 reset, then `hlt` forever (with an in-kernel irqchip
/// and interrupts off the vCPU just parks in the host kernel).
pub fn reset_then_halt() -> Vec<u8> {
    let mut code = vec![
        0xb0,
        I8042_RESET,
        0xe6,
        u8::try_from(I8042_COMMAND_PORT).expect("fits"),
    ];
    code.extend(halt_forever());
    code
}

/// `out 0x80, al` (a port no device claims: one exit to the VMM), then `hlt` forever.
pub fn out_then_halt() -> Vec<u8> {
    let mut code = vec![0xe6, 0x80];
    code.extend(halt_forever());
    code
}

/// `hlt; jmp back to hlt`.
pub fn halt_forever() -> Vec<u8> {
    vec![0xf4, 0xeb, 0xfd]
}

/// `count` exits of `kind`, then the i8042 reset, then `hlt` forever.
pub fn exit_loop(kind: ExitKind, count: u32) -> Vec<u8> {
    let one: &[u8] = match kind {
        ExitKind::Pio => &[0xee],        // out dx, al
        ExitKind::Mmio => &[0x88, 0x03], // mov [rbx], al
    };
    let mut code = Vec::new();
    // Operands of the exiting instruction: dx = port, rbx = MMIO address, al = a marker byte.
    code.extend([0x66, 0xba]); // mov dx, imm16
    code.extend(EXIT_PORT.to_le_bytes());
    code.push(0xbb); // mov ebx, imm32 (zero-extends into rbx)
    code.extend(MMIO_ADDR.to_le_bytes());
    code.extend([0xb0, 0x5a]); // mov al, 0x5a
    let iterations = count / UNROLL;
    if iterations > 0 {
        code.push(0xb9); // mov ecx, imm32
        code.extend(iterations.to_le_bytes());
        let top = code.len();
        for _ in 0..UNROLL {
            code.extend_from_slice(one);
        }
        code.extend([0xff, 0xc9]); // dec ecx
        code.extend([0x0f, 0x85]); // jnz rel32
        let after = code.len() + 4;
        let rel =
            i32::try_from(i64::try_from(top).expect("fits") - i64::try_from(after).expect("fits"))
                .expect("loop body fits rel32");
        code.extend(rel.to_le_bytes());
    }
    for _ in 0..count % UNROLL {
        code.extend_from_slice(one);
    }
    code.extend(reset_then_halt());
    code
}

/// The VMM configuration every in-process row boots a tiny guest ELF with: 1 vCPU, the tiny
/// memory size, no profiler (it is measured on its own; these rows are the VMM core).
pub fn tiny_linux_config(elf: &std::path::Path) -> vmm::builder::linux::LinuxConfig {
    vmm::builder::linux::LinuxConfig {
        kernel: elf.to_path_buf(),
        initrd: None,
        cmdline: None,
        mem_bytes: super::launch::TINY_MEM_BYTES,
        vcpus: 1,
        profile_period: None,
        disk: None,
    }
}

/// A run directory where the VMM keeps its run files by default, on tmpfs (`/dev/shm`; the
/// temporary directory where there is none), private to this bench process: `name` tells the
/// groups apart. The caller removes it.
pub fn run_dir(name: &str) -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("mirrorball-bench-{}-{name}", std::process::id()))
}

/// A scratch directory for this process's guest files, removed on drop.
pub struct Scratch {
    dir: std::path::PathBuf,
}

impl Scratch {
    /// Creates the directory under the system temporary directory.
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("mirrorball-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }

    /// Writes `data` to `name` in the directory and returns its path.
    pub fn file(&self, name: &str, data: &[u8]) -> anyhow::Result<std::path::PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, data)?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
