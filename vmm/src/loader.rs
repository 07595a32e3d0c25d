//! Loading a Linux kernel (ELF vmlinux or bzImage), its initramfs and command line into guest
//! memory, with every user mistake (missing, truncated or foreign files, sizes that do not fit)
//! reported as one clear error.
use std::io::Cursor;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIGH_RAM_START, PAGE_SIZE};

/// Default kernel command line: serial console, reboot through the keyboard controller (which
/// ends the VM), reboot one second after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// Highest initramfs address when the kernel does not say (boot protocol default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors loading the guest's boot files.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A boot file is not a regular file.
    #[error("{what} {} is not a regular file (a device, FIFO or directory cannot be loaded)", path.display())]
    NotRegular {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// An ELF kernel that cannot be loaded as it is.
    #[error("kernel {} is not a loadable x86-64 ELF: {why}", path.display())]
    BadElf {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The kernel is neither format.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" setup header)")]
    UnknownFormat(PathBuf),
    /// The bzImage is older than the 64-bit boot protocol.
    #[error(
        "bzImage {0} has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)"
    )]
    No64BitEntry(PathBuf),
    /// The file is shorter than its own header says.
    #[error("kernel {path} is truncated: {len} bytes, its header needs {needed}")]
    Truncated {
        /// Path.
        path: PathBuf,
        /// Actual length.
        len: usize,
        /// Length the header implies.
        needed: usize,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {source}")]
    Kernel {
        /// Path.
        path: PathBuf,
        /// The loader's error.
        source: linux_loader::loader::Error,
    },
    /// Guest memory is too small.
    #[error("--mem of {mem_mib} MiB is too small: {what} needs memory up to {needed_mib} MiB")]
    TooSmall {
        /// What did not fit.
        what: &'static str,
        /// MiB of guest RAM.
        mem_mib: u64,
        /// MiB needed.
        needed_mib: u64,
    },
    /// The command line is too long or has a NUL.
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line fits, but not with what the VMM appends to it.
    #[error(
        "kernel command line is {len} bytes with the {added} bytes the VMM appends \
         ({appended:?}); at most {max} fit: shorten --cmdline"
    )]
    CmdlineTooLongWithAdded {
        /// Its length with the appended part.
        len: usize,
        /// Bytes appended by the VMM.
        added: usize,
        /// What was appended.
        appended: String,
        /// The limit.
        max: usize,
    },
    /// The ELF entry point lies beyond everything the image loads.
    #[error("kernel {path} has its entry point {entry:#x} outside its loaded segments")]
    EntryOutsideImage {
        /// Path.
        path: PathBuf,
        /// The entry point.
        entry: u64,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Writing to guest memory failed.
    #[error("cannot write {0} to guest memory")]
    Write(&'static str),
}

/// What the boot vCPU and the zero page need to know about the loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte above the loaded image.
    pub end: u64,
    /// The bzImage setup header, `None` for ELF.
    pub setup_header: Option<setup_header>,
}

/// Reads a boot file that must fit in `max` bytes of guest RAM, doing bounded work before any
/// check: it is opened without blocking (a FIFO cannot hang us), must be a regular file (not
/// `/dev/zero`, a directory or a FIFO), and its size is checked before a byte is read.
fn read(what: &'static str, path: &Path, max: u64) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| LoadError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(LoadError::NotRegular {
            what,
            path: path.to_path_buf(),
        });
    }
    if meta.len() > max {
        return Err(LoadError::TooSmall {
            what: if what == "kernel" {
                "the kernel"
            } else {
                "kernel plus initrd"
            },
            mem_mib: max >> 20,
            needed_mib: meta.len().div_ceil(1 << 20),
        });
    }
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The file may grow after the check: never read more than `max` + 1 bytes.
    file.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(err)?;
    if data.len() as u64 > max {
        return Err(LoadError::TooSmall {
            what: "a boot file that grew while it was read",
            mem_mib: max >> 20,
            needed_mib: (data.len() as u64).div_ceil(1 << 20),
        });
    }
    Ok(data)
}

/// `e_machine` of x86-64.
const EM_X86_64: u16 = 62;

/// Refuses an ELF image for another machine, or with a loadable segment whose file part is
/// larger than its memory part (the loader would copy more than the segment holds).
fn check_elf(image: &[u8], path: &Path) -> Result<(), LoadError> {
    let bad = |why: String| LoadError::BadElf {
        path: path.to_path_buf(),
        why,
    };
    let word = |off: usize, len: usize| -> Option<u64> {
        let b = image.get(off..off.checked_add(len)?)?;
        let mut v = [0u8; 8];
        v[..len].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    if image.get(4) != Some(&2) {
        return Err(bad("not a 64-bit ELF file".into()));
    }
    let machine = word(0x12, 2)
        .and_then(|w| u16::try_from(w).ok())
        .unwrap_or(0);
    if machine != EM_X86_64 {
        return Err(bad(format!(
            "built for machine {machine} (e_machine), not x86-64 (62)"
        )));
    }
    let (Some(phoff), Some(phnum)) = (word(0x20, 8), word(0x38, 2)) else {
        return Err(bad("its header is truncated".into()));
    };
    for i in 0..phnum {
        let Some(ph) = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(usize::try_from(i).ok()? * 56))
        else {
            return Err(bad("its program headers lie outside the file".into()));
        };
        let at = |off: usize, len: usize| word(ph.checked_add(off)?, len);
        let (Some(kind), Some(filesz), Some(memsz)) = (at(0, 4), at(0x20, 8), at(0x28, 8)) else {
            return Err(bad("its program headers lie outside the file".into()));
        };
        if kind == 1 && filesz > memsz {
            return Err(bad(format!(
                "loadable segment {i} has p_filesz {filesz:#x} > p_memsz {memsz:#x}"
            )));
        }
    }
    Ok(())
}

/// Parses and checks a bzImage's setup header without loading it.
pub fn bzimage_header(image: &[u8], path: &Path) -> Result<Option<setup_header>, LoadError> {
    let size = std::mem::size_of::<setup_header>();
    let Some(bytes) = image.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size) else {
        return Ok(None);
    };
    let Some(hdr) = setup_header::from_slice(bytes).copied() else {
        return Ok(None);
    };
    if hdr.header != 0x5372_6448 {
        return Ok(None);
    }
    if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::No64BitEntry(path.to_path_buf()));
    }
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        usize::from(hdr.setup_sects)
    };
    let needed = (setup_sects + 1) * 512 + hdr.syssize as usize * 16;
    if image.len() < needed {
        return Err(LoadError::Truncated {
            path: path.to_path_buf(),
            len: image.len(),
            needed,
        });
    }
    Ok(Some(hdr))
}

/// Loads the kernel at `path` into `mem`, whose RAM below 4 GiB ends at `low_ram_end`.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    low_ram_end: u64,
    path: &Path,
) -> Result<LoadedKernel, LoadError> {
    let image = read("kernel", path, low_ram_end)?;
    let kernel_err = |source| LoadError::Kernel {
        path: path.to_path_buf(),
        source,
    };
    let too_small = |needed: u64| LoadError::TooSmall {
        what: "the kernel",
        mem_mib: low_ram_end >> 20,
        needed_mib: needed.div_ceil(1 << 20),
    };
    if image.starts_with(b"\x7fELF") {
        check_elf(&image, path)?;
        let end = elf_end(&image);
        if end > low_ram_end {
            return Err(too_small(end));
        }
        let loaded = Elf::load(
            mem,
            None,
            &mut Cursor::new(&image),
            Some(GuestAddress(HIGH_RAM_START)),
        )
        .map_err(kernel_err)?;
        if loaded.kernel_end > low_ram_end {
            return Err(too_small(loaded.kernel_end));
        }
        if loaded.kernel_load.0 >= loaded.kernel_end.max(HIGH_RAM_START) {
            return Err(LoadError::EntryOutsideImage {
                path: path.to_path_buf(),
                entry: loaded.kernel_load.0,
            });
        }
        return Ok(LoadedKernel {
            entry: loaded.kernel_load.0,
            end: loaded.kernel_end,
            setup_header: None,
        });
    }
    let Some(hdr) = bzimage_header(&image, path)? else {
        return Err(LoadError::UnknownFormat(path.to_path_buf()));
    };
    // The decompressor needs `init_size` bytes from where the kernel runs (its preferred address).
    // Both come from the file: saturate, so a huge `pref_address` reads as "too big", not as a wrap.
    let needed = hdr
        .pref_address
        .max(u64::from(hdr.code32_start))
        .saturating_add(u64::from(hdr.init_size));
    if needed > low_ram_end {
        return Err(too_small(needed));
    }
    let loaded = BzImage::load(
        mem,
        None,
        &mut Cursor::new(&image),
        Some(GuestAddress(HIGH_RAM_START)),
    )
    .map_err(kernel_err)?;
    Ok(LoadedKernel {
        entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        end: loaded.kernel_end,
        setup_header: loaded.setup_header,
    })
}

/// Highest physical end (`p_paddr + p_memsz`) of an ELF64 image's loadable segments, 0 where
/// the headers are unreadable (the loader then reports the problem).
fn elf_end(image: &[u8]) -> u64 {
    let word = |off: usize, len: usize| -> Option<u64> {
        let b = image.get(off..off.checked_add(len)?)?;
        let mut v = [0u8; 8];
        v[..len].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    let (Some(phoff), Some(phnum)) = (word(0x20, 8), word(0x38, 2)) else {
        return 0;
    };
    (0..phnum)
        .filter_map(|i| {
            let ph = usize::try_from(phoff)
                .ok()?
                .checked_add(usize::try_from(i).ok()?.checked_mul(56)?)?;
            let at = |off: usize, len: usize| word(ph.checked_add(off)?, len);
            let (kind, paddr, memsz) = (at(0, 4)?, at(0x18, 8)?, at(0x28, 8)?);
            (kind == 1).then(|| paddr.saturating_add(memsz))
        })
        .max()
        .unwrap_or(0)
}

/// Loads the initramfs as high as allowed below `limit`, above the kernel. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<(u64, u64), LoadError> {
    let data = read(
        "initrd",
        path,
        low_ram_end.saturating_sub(kernel.end.min(low_ram_end)),
    )?;
    let size = data.len() as u64;
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let start = limit.saturating_sub(size) & !(PAGE_SIZE - 1);
    if size > limit || start < kernel.end {
        return Err(LoadError::TooSmall {
            what: "kernel plus initrd",
            mem_mib: low_ram_end >> 20,
            needed_mib: (kernel.end + size + PAGE_SIZE).div_ceil(1 << 20),
        });
    }
    mem.write_slice(&data, GuestAddress(start))
        .map_err(|_| LoadError::Write("initrd"))?;
    Ok((start, size))
}

/// Checks a command line against the kernel's limit (`cmdline_size` from its header, if any).
pub fn check_cmdline(cmdline: &str, kernel_limit: Option<u32>) -> Result<(), LoadError> {
    let max = kernel_limit
        .map(|l| (l as usize).saturating_add(1))
        .unwrap_or(CMDLINE_MAX_SIZE)
        .min(CMDLINE_MAX_SIZE);
    if cmdline.len() + 1 > max {
        return Err(LoadError::CmdlineTooLong {
            len: cmdline.len(),
            max: max - 1,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(LoadError::CmdlineNul);
    }
    Ok(())
}

/// Writes `user` followed by ` appended` (what the VMM adds: PVM CPU-feature switches, the
/// profiler device); a line too long says how much of it the VMM added. Returns its length.
pub fn load_cmdline_with(
    mem: &GuestMemoryMmap,
    user: &str,
    appended: &str,
    kernel_limit: Option<u32>,
) -> Result<usize, LoadError> {
    if appended.is_empty() {
        return load_cmdline(mem, user, kernel_limit);
    }
    let full = format!("{user} {appended}");
    match load_cmdline(mem, &full, kernel_limit) {
        Err(LoadError::CmdlineTooLong { len, max }) => Err(LoadError::CmdlineTooLongWithAdded {
            len,
            added: len - user.len(),
            appended: appended.to_string(),
            max,
        }),
        other => other,
    }
}

/// Checks and writes the command line; returns its length without the NUL.
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    kernel_limit: Option<u32>,
) -> Result<usize, LoadError> {
    check_cmdline(cmdline, kernel_limit)?;
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| LoadError::Write("command line"))?;
    Ok(cmdline.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(bytes: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).expect("mem")
    }

    fn temp(name: &str, data: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mirrorball-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join(name);
        std::fs::write(&p, data).expect("write");
        p
    }

    fn fake_bzimage(version: u16, xloadflags: u16, syssize: u32, len: usize) -> Vec<u8> {
        let mut img = vec![0u8; len];
        let mut hdr = setup_header {
            setup_sects: 1,
            header: 0x5372_6448,
            version,
            xloadflags,
            syssize,
            loadflags: 1,
            code32_start: 0x10_0000,
            init_size: 0x10_0000,
            ..Default::default()
        };
        hdr.boot_flag = 0xaa55;
        img[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()]
            .copy_from_slice(hdr.as_slice());
        img
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let err =
            load_kernel(&mem(16 << 20), 16 << 20, Path::new("/nonexistent/bzImage")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/bzImage"), "{err}");
    }

    #[test]
    fn random_bytes_are_not_a_kernel() {
        let mut seed = 0x1234_5678u32;
        let junk: Vec<u8> = (0..8192)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                ((seed >> 16) & 0xff) as u8
            })
            .collect();
        let p = temp("junk", &junk);
        assert!(matches!(
            load_kernel(&mem(16 << 20), 16 << 20, &p),
            Err(LoadError::UnknownFormat(_))
        ));
        let p = temp("empty", &[]);
        assert!(matches!(
            load_kernel(&mem(16 << 20), 16 << 20, &p),
            Err(LoadError::UnknownFormat(_))
        ));
    }

    #[test]
    fn old_or_truncated_bzimage_is_refused() {
        let p = temp("old", &fake_bzimage(0x0206, 0, 1, 4096));
        assert!(matches!(
            load_kernel(&mem(32 << 20), 32 << 20, &p),
            Err(LoadError::No64BitEntry(_))
        ));
        let p = temp("short", &fake_bzimage(0x020f, 1, 0x1000, 4096));
        assert!(matches!(
            load_kernel(&mem(32 << 20), 32 << 20, &p),
            Err(LoadError::Truncated {
                needed: 0x10400,
                ..
            })
        ));
    }

    /// Found by the `kernel_loader` fuzz target: a `pref_address` near `u64::MAX` overflowed the
    /// "does the decompressor fit" sum (a panic in debug builds, a bypassed check in release).
    #[test]
    fn huge_pref_address_is_too_small_not_overflow() {
        let mut img = fake_bzimage(0x020f, 1, 0x10, 2048);
        let pref = SETUP_HEADER_OFFSET + std::mem::offset_of!(setup_header, pref_address);
        img[pref..pref + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let p = temp("huge-pref", &img);
        let err = load_kernel(&mem(32 << 20), 32 << 20, &p).unwrap_err();
        assert!(matches!(err, LoadError::TooSmall { .. }), "{err}");
    }

    #[test]
    fn bzimage_loads_with_64bit_entry() {
        let p = temp("ok", &fake_bzimage(0x020f, 1, 0x10, 2048));
        let k = load_kernel(&mem(32 << 20), 32 << 20, &p).expect("load");
        assert_eq!(k.entry, 0x10_0200);
        assert!(k.setup_header.is_some());
        let p = temp("ok2", &fake_bzimage(0x020f, 1, 0x10, 2048));
        let err = load_kernel(&mem(2 << 20), (2 << 20) - 4096, &p).unwrap_err();
        assert!(
            matches!(err, LoadError::TooSmall { needed_mib: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn elf_entry_beyond_the_image_is_refused() {
        let mut elf = vec![0u8; 0x200];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4..8].copy_from_slice(&[2, 1, 1, 0]);
        elf[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        elf[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes());
        elf[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        elf[0x18..0x20].copy_from_slice(&0x800_0000u64.to_le_bytes()); // entry: 128 MiB
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes()); // offset
        elf[ph + 0x18..ph + 0x20].copy_from_slice(&0x100_0000u64.to_le_bytes()); // paddr
        elf[ph + 0x20..ph + 0x28].copy_from_slice(&0x10u64.to_le_bytes()); // filesz
        elf[ph + 0x28..ph + 0x30].copy_from_slice(&0x10u64.to_le_bytes()); // memsz
        let p = temp("far-entry", &elf);
        let err = load_kernel(&mem(32 << 20), 32 << 20, &p).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::EntryOutsideImage {
                    entry: 0x800_0000,
                    ..
                }
            ),
            "{err}"
        );
    }

    fn tiny_elf(machine: u16, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut elf = vec![0u8; 0x200];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4..8].copy_from_slice(&[2, 1, 1, 0]);
        elf[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        elf[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        elf[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        elf[0x18..0x20].copy_from_slice(&0x100_0000u64.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
        elf[ph + 0x18..ph + 0x20].copy_from_slice(&0x100_0000u64.to_le_bytes());
        elf[ph + 0x20..ph + 0x28].copy_from_slice(&filesz.to_le_bytes());
        elf[ph + 0x28..ph + 0x30].copy_from_slice(&memsz.to_le_bytes());
        elf
    }

    /// Found by the `kernel_loader` fuzz target: a program-header offset near `usize::MAX`
    /// overflowed `ph + field` (a panic with overflow checks on).
    #[test]
    fn program_headers_at_the_top_of_the_address_space_are_refused() {
        let mut elf = tiny_elf(62, 0x10, 0x10);
        elf[0x20..0x28].copy_from_slice(&(u64::MAX - 0x10).to_le_bytes());
        let p = temp("elf-phoff-max", &elf);
        let err = load_kernel(&mem(32 << 20), 32 << 20, &p).unwrap_err();
        assert!(err.to_string().contains("program headers"), "{err}");
    }

    #[test]
    fn foreign_or_inconsistent_elf_is_refused() {
        let ok = temp("elf-ok", &tiny_elf(62, 0x10, 0x10));
        load_kernel(&mem(32 << 20), 32 << 20, &ok).expect("a good tiny ELF loads");
        let arm = temp("elf-arm", &tiny_elf(183, 0x10, 0x10));
        let err = load_kernel(&mem(32 << 20), 32 << 20, &arm).unwrap_err();
        assert!(err.to_string().contains("not x86-64"), "{err}");
        let fat = temp("elf-fat", &tiny_elf(62, 0x100, 0x10));
        let err = load_kernel(&mem(32 << 20), 32 << 20, &fat).unwrap_err();
        assert!(err.to_string().contains("p_filesz"), "{err}");
    }

    #[test]
    fn boot_files_must_be_regular_and_fit_before_they_are_read() {
        let start = std::time::Instant::now();
        // A FIFO nobody writes would block a plain open or read forever.
        let fifo =
            std::env::temp_dir().join(format!("mirrorball-loader-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
        // SAFETY: creates a FIFO at a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for path in [fifo.as_path(), Path::new("/dev/zero"), Path::new("/tmp")] {
            let err = load_kernel(&mem(16 << 20), 16 << 20, path).unwrap_err();
            assert!(matches!(err, LoadError::NotRegular { .. }), "{err}");
        }
        let _ = std::fs::remove_file(&fifo);
        // A 4 GiB sparse file is refused on its size, without reading it.
        let sparse = temp("sparse", b"");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&sparse)
            .expect("open")
            .set_len(4 << 30)
            .expect("sparse");
        let err = load_kernel(&mem(16 << 20), 16 << 20, &sparse).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::TooSmall {
                    needed_mib: 4096,
                    ..
                }
            ),
            "{err}"
        );
        let kernel = LoadedKernel {
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        };
        let err = load_initrd(&mem(16 << 20), &sparse, &kernel, 16 << 20).unwrap_err();
        assert!(matches!(err, LoadError::TooSmall { .. }), "{err}");
        let _ = std::fs::remove_file(&sparse);
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let m = mem(32 << 20);
        let kernel = LoadedKernel {
            entry: 0x100_0000,
            end: 0x180_0000,
            setup_header: None,
        };
        let p = temp("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&m, &p, &kernel, 32 << 20).expect("initrd");
        assert_eq!(size, 5000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 32 << 20 && addr >= kernel.end);
        let big = temp("big", &vec![0u8; 9 << 20]);
        assert!(matches!(
            load_initrd(&m, &big, &kernel, 32 << 20),
            Err(LoadError::TooSmall { .. })
        ));
    }

    #[test]
    fn a_line_too_long_with_the_vmms_additions_says_so() {
        let user = "x".repeat(2040);
        let err = load_cmdline_with(&mem(1 << 20), &user, "noxsave clearcpuid=1", Some(2047))
            .unwrap_err()
            .to_string();
        assert!(err.contains("the 21 bytes the VMM appends"), "{err}");
        assert!(err.contains("2061 bytes") && err.contains("2047"), "{err}");
        load_cmdline_with(&mem(1 << 20), "console=ttyS0", "noxsave", None).expect("fits");
    }

    #[test]
    fn cmdline_limits() {
        let m = mem(1 << 20);
        assert_eq!(
            load_cmdline(&m, "console=ttyS0", None).expect("cmdline"),
            13
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            load_cmdline(&m, &long, None),
            Err(LoadError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            load_cmdline(&m, "a\0b", None),
            Err(LoadError::CmdlineNul)
        ));
        assert!(matches!(
            load_cmdline(&m, "0123456789", Some(5)),
            Err(LoadError::CmdlineTooLong { max: 5, .. })
        ));
    }
}
