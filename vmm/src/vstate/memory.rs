//! Guest RAM and where it comes from: a fresh memfd of its own, or a private copy-on-write view of
//! a sealed template that many VMs share.
//!
//! memfd (not anonymous memory) so that a template's pages can be mapped copy-on-write into clones
//! and host tools can see a VM's memory as a file. A fresh memfd is sized with `ftruncate`, sealed
//! against resizing, and populated lazily: the first guest touch of a page is a host page fault
//! charged to the vCPU thread that made it. A [`Template`] is prepared once through a writable
//! shared mapping ([`TemplateBuilder`]), then unmapped and sealed against writes; each clone maps it
//! `MAP_PRIVATE`, so reads share the template's pages and a write copies that one page.
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START, PAGE_SIZE};

/// Smallest guest RAM accepted.
pub const MIN_RAM_BYTES: u64 = 2 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or below the minimum.
    #[error("guest memory of {0} bytes is too small (minimum {MIN_RAM_BYTES} bytes)")]
    TooSmall(u64),
    /// The size is not a whole number of pages.
    #[error("guest memory of {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    /// The size exceeds the host's physical memory.
    #[error("guest memory of {requested} MiB exceeds the host's {host} MiB of RAM")]
    ExceedsHost {
        /// MiB asked for.
        requested: u64,
        /// MiB the host has.
        host: u64,
    },
    /// memfd_create, ftruncate or fcntl failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// Sealing the memory file failed.
    #[error("cannot seal the guest memory file: {0}")]
    Seal(std::io::Error),
    /// Mapping the memory failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// Splits `size` bytes of RAM around the 32-bit device hole: (guest address, length) pairs.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Total RAM of the host in bytes, from /proc/meminfo.
pub fn host_ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Checks a RAM size: at least [`MIN_RAM_BYTES`], whole pages, no more than the host has.
pub fn check_size(size: u64) -> Result<(), MemoryError> {
    if size < MIN_RAM_BYTES {
        return Err(MemoryError::TooSmall(size));
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::Unaligned(size));
    }
    if let Some(host) = host_ram_bytes() {
        if size > host {
            return Err(MemoryError::ExceedsHost {
                requested: size >> 20,
                host: host >> 20,
            });
        }
    }
    Ok(())
}

fn fcntl_seal(file: &File, seals: libc::c_int) -> Result<(), MemoryError> {
    // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if rc < 0 {
        return Err(MemoryError::Seal(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A memfd of `size` bytes that can be sealed, already sealed against resizing.
fn create_memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(name).map_err(|e| MemoryError::Memfd(e.into()))?;
    // SAFETY: `cname` is a valid NUL-terminated string; the call only returns a new fd.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    fcntl_seal(&file, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)?;
    Ok(file)
}

/// Maps `file` over the RAM ranges of `size` bytes, shared or private (copy-on-write).
fn map_ranges(file: &File, size: u64, private: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let flags = if private {
        libc::MAP_PRIVATE | libc::MAP_NORESERVE
    } else {
        libc::MAP_SHARED | libc::MAP_NORESERVE
    };
    let mut offset = 0;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let map_err = |e: &dyn std::fmt::Display| MemoryError::Map(e.to_string());
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        let bytes = usize::try_from(len).map_err(|e| map_err(&e))?;
        let mapping = MmapRegionBuilder::new(bytes)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| map_err(&e))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Map(format!("range at {start:#x} overflows")))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Guest RAM of one VM.
#[derive(Debug)]
pub struct GuestRam {
    /// Under the userfaultfd pager, the registration of this RAM (dropped first, before the
    /// mapping goes away).
    paging: Option<crate::budget::uffd::Registration>,
    /// Under a lazy restore's loader, the registration of this RAM (dropped before the mapping).
    lazy: Option<crate::snapshot::lazy::LazyRegistration>,
    memory: GuestMemoryMmap,
    file: File,
    ranges: Vec<(u64, u64)>,
    size: u64,
    template: Option<Arc<Template>>,
    /// Offered to KSM ([`GuestRam::mark_mergeable`]).
    mergeable: std::sync::atomic::AtomicBool,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM backed by a new memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let file = create_memfd("mirrorball-guest-ram", size)?;
        Ok(Self {
            paging: None,
            lazy: None,
            memory: map_ranges(&file, size, false)?,
            file,
            ranges: ram_ranges(size),
            size,
            template: None,
            mergeable: Default::default(),
        })
    }

    /// `size` bytes of RAM whose memfd is mapped privately: every page the guest writes becomes
    /// anonymous memory of this process (what KSM can merge; it never merges shared file pages).
    pub fn new_private(size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let file = create_memfd("mirrorball-guest-ram", size)?;
        Ok(Self {
            paging: None,
            lazy: None,
            memory: map_ranges(&file, size, true)?,
            file,
            ranges: ram_ranges(size),
            size,
            template: None,
            mergeable: Default::default(),
        })
    }

    /// Offers the RAM to the kernel's same-page merging (KSM): identical private pages of any
    /// VMs may be merged into one copy-on-write page.
    pub fn mark_mergeable(&self) -> Result<(), MemoryError> {
        for region in self.memory.iter() {
            // SAFETY: advice on a mapping this object owns, of its exact extent; MADV_MERGEABLE
            // does not change the contents.
            let rc = unsafe {
                libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_MERGEABLE)
            };
            if rc != 0 {
                return Err(MemoryError::Map(format!(
                    "madvise(MADV_MERGEABLE): {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        self.mergeable
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether the RAM was offered to KSM.
    pub fn is_mergeable(&self) -> bool {
        self.mergeable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Host address ranges of the RAM mappings (start, length).
    pub fn host_ranges(&self) -> Vec<(usize, usize)> {
        self.memory
            .iter()
            .map(|r| (r.as_ptr() as usize, r.size()))
            .collect()
    }

    /// Whether the RAM is a private (copy-on-write) mapping.
    pub fn is_private(&self) -> bool {
        self.memory
            .iter()
            .next()
            .is_some_and(|r| r.flags() & libc::MAP_PRIVATE != 0)
    }

    /// RAM that starts as a private copy-on-write view of `template`.
    pub fn clone_of(template: &Arc<Template>) -> Result<Self, MemoryError> {
        let file = template.file.try_clone().map_err(MemoryError::Memfd)?;
        Ok(Self {
            paging: None,
            lazy: None,
            memory: map_ranges(&file, template.size, true)?,
            file,
            ranges: ram_ranges(template.size),
            size: template.size,
            template: Some(template.clone()),
            mergeable: Default::default(),
        })
    }

    /// Puts the RAM under the process's userfaultfd pager (`crate::budget::uffd`): its pages
    /// count against the budget and may be evicted to the pager's swap file.
    pub fn attach_pager(
        &mut self,
        pager: &Arc<crate::budget::uffd::Pager>,
    ) -> Result<(), crate::budget::uffd::PagerError> {
        self.paging = Some(pager.register(&self.host_ranges())?);
        Ok(())
    }

    /// Loads the RAM's pages from a snapshot's memory file on first touch (`--lazy` restore);
    /// before anything touched it.
    pub fn attach_lazy(
        &mut self,
        loader: &Arc<crate::snapshot::lazy::LazyLoader>,
    ) -> std::io::Result<()> {
        self.lazy = Some(loader.register(&self.host_ranges())?);
        Ok(())
    }

    /// Under a lazy restore, its registration (the counts, the memory file of pages not loaded).
    pub fn lazy(&self) -> Option<&crate::snapshot::lazy::LazyRegistration> {
        self.lazy.as_ref()
    }

    /// The mapped memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// RAM ranges as (guest address, length).
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd backing the RAM (the template's, for a clone).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The template this RAM is a copy-on-write view of, if any.
    pub fn template(&self) -> Option<&Arc<Template>> {
        self.template.as_ref()
    }
}

/// A template being prepared: writable shared memory that becomes a sealed [`Template`].
pub struct TemplateBuilder {
    memory: GuestMemoryMmap,
    file: File,
    size: u64,
}

impl TemplateBuilder {
    /// `size` bytes of zeroed template memory, mapped writable.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let file = create_memfd("mirrorball-template", size)?;
        Ok(Self {
            memory: map_ranges(&file, size, false)?,
            file,
            size,
        })
    }

    /// The memory to prepare.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// RAM ranges as (guest address, length).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        ram_ranges(self.size)
    }

    /// Unmaps the writable view and seals the file against writes: from here on it can only be
    /// mapped privately.
    pub fn seal(self) -> Result<Template, MemoryError> {
        let Self { memory, file, size } = self;
        // F_SEAL_WRITE fails while a writable shared mapping exists.
        drop(memory);
        fcntl_seal(&file, libc::F_SEAL_WRITE | libc::F_SEAL_SEAL)?;
        Ok(Template { file, size })
    }
}

/// A sealed template: guest memory prepared once, shared copy-on-write by its clones.
#[derive(Debug)]
pub struct Template {
    file: File,
    size: u64,
}

impl Template {
    /// A template over a file prepared elsewhere (a snapshot's memory file, laid out as
    /// [`ram_ranges`] one after another), never written through: clones map it privately.
    pub fn from_file(file: File, size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        Ok(Self { file, size })
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The sealed memfd.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of host memory the template file holds now (pages it was given or that clones read
    /// from its holes).
    pub fn resident_bytes(&self) -> u64 {
        file_resident_bytes(&self.file)
    }
}

/// Bytes of memory a tmpfs/memfd file holds (its allocated blocks).
pub fn file_resident_bytes(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .map_or(0, |m| m.blocks().saturating_mul(512))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestRam::new(0), Err(MemoryError::TooSmall(0))));
        assert!(matches!(
            GuestRam::new((4 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
        let host = host_ram_bytes().expect("meminfo");
        let too_big = (host / PAGE_SIZE + 1024) * PAGE_SIZE;
        assert!(matches!(
            GuestRam::new(too_big),
            Err(MemoryError::ExceedsHost { .. })
        ));
    }

    #[test]
    fn memory_is_backed_by_the_memfd_and_cannot_be_resized() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(4 << 20).expect("ram");
        ram.memory()
            .write_obj(0xfeed_u32, GuestAddress(0x2000))
            .expect("write");
        let mut buf = [0u8; 4];
        ram.file().read_exact_at(&mut buf, 0x2000).expect("read");
        assert_eq!(u32::from_le_bytes(buf), 0xfeed);
        assert_eq!(ram.size(), 4 << 20);
        assert!(ram.file().set_len(1 << 20).is_err(), "shrinking is sealed");
        assert!(ram.file().set_len(8 << 20).is_err(), "growing is sealed");
    }

    #[test]
    fn clones_share_the_template_and_copy_on_write() {
        use std::os::unix::fs::FileExt;
        let builder = TemplateBuilder::new(4 << 20).expect("template");
        builder
            .memory()
            .write_obj(0x1111_u32, GuestAddress(0x3000))
            .expect("write");
        let template = Arc::new(builder.seal().expect("seal"));
        assert!(
            template.file().write_at(&[1], 0).is_err(),
            "the template is sealed against writes"
        );
        let a = GuestRam::clone_of(&template).expect("clone a");
        let b = GuestRam::clone_of(&template).expect("clone b");
        let read = |ram: &GuestRam, gpa: u64| -> u32 {
            ram.memory().read_obj(GuestAddress(gpa)).expect("read")
        };
        assert_eq!(read(&a, 0x3000), 0x1111, "a clone starts as the template");
        a.memory()
            .write_obj(0x2222_u32, GuestAddress(0x3000))
            .expect("write");
        a.memory()
            .write_obj(0x3333_u32, GuestAddress(0x5000))
            .expect("write");
        assert_eq!(read(&a, 0x3000), 0x2222);
        assert_eq!(read(&b, 0x3000), 0x1111, "a write stays in its clone");
        assert_eq!(read(&b, 0x5000), 0, "a fresh page starts zeroed");
        let mut buf = [0u8; 4];
        template
            .file()
            .read_exact_at(&mut buf, 0x3000)
            .expect("read");
        assert_eq!(u32::from_le_bytes(buf), 0x1111, "the template is unchanged");
        assert_eq!(a.template().map(|t| t.size()), Some(4 << 20));
    }
}
