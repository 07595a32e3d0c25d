//! A VM that boots a Linux kernel through the 64-bit boot protocol. Its memory image (kernel,
//! initramfs, command line, zero page with the e820 map, MP table, GDT and page tables) is the
//! same for every VM of one configuration, so it can live in a template; each VM then gets its
//! in-kernel interrupt chips, serial console, i8042, the profiler device and its vCPUs.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mirrorball_devices::bus::Bus;
use mirrorball_devices::virtio_mmio::VIRTIO_MMIO_WINDOW;
use mirrorball_devices::ProfilerDeviceConfig;
use mirrorball_profiler_abi::{ABI_VERSION_MAJOR, ABI_VERSION_MINOR};
use mirrorball_workload::PROFILER_REGION_GPA;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::{boot_params, gdt, lapic, layout, mptable, msr, paging, regs};
use crate::devices::{add_disk_device, add_profiler_device, LegacyDevices};
use crate::host::HostContext;
use crate::loader::{self, DEFAULT_CMDLINE};
use crate::profiling::sharing::SharingScanner;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{ExitHandler, Vcpu, VmControl};
use crate::vstate::vm::Vm;

use super::platform::{MmioSlot, PlatformAllocator};
use super::{
    check_vcpus, configure_cpuid, publish_profiler_regions, BuildError, BuiltVm, Guest, Profiling,
    VmResources,
};
use crate::profiling::regions::RegionRequest;

/// Default guest RAM for Linux.
pub const DEFAULT_MEM_BYTES: u64 = 256 << 20;

/// What to boot.
#[derive(Clone, Debug)]
pub struct LinuxConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Command line; [`DEFAULT_CMDLINE`] when `None`.
    pub cmdline: Option<String>,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Profiler sampling period; `None` leaves the profiler (device and regions) out.
    pub profile_period: Option<Duration>,
    /// The copy-on-write disk (`--disk`), a virtio-blk device after the profiler's.
    pub disk: Option<super::disk::DiskSpec>,
}

impl LinuxConfig {
    pub(super) fn check(&self) -> Result<(), BuildError> {
        check_vcpus(self.vcpus, usize::from(mptable::MAX_CPUS))?;
        let files = std::iter::once(("kernel", &self.kernel))
            .chain(self.initrd.as_ref().map(|i| ("initrd", i)));
        for (what, path) in files {
            std::fs::metadata(path).map_err(|source| loader::LoadError::Read {
                what,
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    pub(super) fn template_key(&self) -> Vec<(&'static str, String)> {
        let file = |p: &PathBuf| {
            let meta = std::fs::metadata(p).ok();
            let stamp = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!(
                "{} ({} bytes, {stamp})",
                p.display(),
                meta.map_or(0, |m| m.len())
            )
        };
        vec![
            ("kernel", file(&self.kernel)),
            ("initrd", self.initrd.as_ref().map_or("none".into(), file)),
            (
                "command line",
                self.cmdline
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CMDLINE.into()),
            ),
            ("vCPU count", self.vcpus.to_string()),
            ("profiler", self.profile_period.is_some().to_string()),
            (
                "disk",
                self.disk
                    .as_ref()
                    .map_or("none".into(), |d| d.base.path().display().to_string()),
            ),
        ]
    }

    /// The devices every VM of this configuration gets, in allocation order.
    fn platform(&self, ram_slots: u32) -> Result<(PlatformAllocator, LinuxPlatform), BuildError> {
        let mut alloc = PlatformAllocator::new(ram_slots);
        let profiler = match self.profile_period {
            Some(_) => Some((alloc.memslot(), alloc.virtio_mmio(VIRTIO_MMIO_WINDOW)?)),
            None => None,
        };
        let disk = match self.disk {
            Some(_) => Some(alloc.virtio_mmio(VIRTIO_MMIO_WINDOW)?),
            None => None,
        };
        Ok((alloc, LinuxPlatform { profiler, disk }))
    }
}

/// Builds one Linux VM with memory of its own, its console to `console`, its profiler regions
/// published in `run_dir`.
pub fn build(
    config: &LinuxConfig,
    console: super::ConsoleSink,
    run_dir: &std::path::Path,
) -> Result<BuiltVm, BuildError> {
    super::build_single(&super::GuestConfig::Linux(config.clone()), console, run_dir)
}

/// Where a Linux VM's devices are.
struct LinuxPlatform {
    /// The profiler region's memory slot and the profiler device's window.
    profiler: Option<(u32, MmioSlot)>,
    /// The disk device's window.
    disk: Option<MmioSlot>,
}

/// What writing a Linux image produced.
#[derive(Clone, Debug)]
pub struct LinuxImage {
    /// The kernel's 64-bit entry point.
    pub entry: u64,
    /// The command line as written (with what the VMM appended).
    pub cmdline: String,
}

/// Writes kernel, initramfs, command line and boot structures into `mem`.
pub(super) fn write_image(
    config: &LinuxConfig,
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    host: &HostContext,
) -> Result<LinuxImage, BuildError> {
    let low_end = boot_params::low_ram_end(ram);
    let kernel = loader::load_kernel(mem, low_end, &config.kernel)?;
    let limit = kernel.setup_header.map(|h| h.cmdline_size);
    let mut cmdline = config
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    loader::check_cmdline(&cmdline, limit)?;
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(mem, path, &kernel, low_end)?),
        None => None,
    };
    let mut appended = Vec::new();
    if !cmdline.contains("clearcpuid=") {
        // PVM restores host features that KVM_SET_CPUID2 hid, so the guest kernel must be told
        // on its command line not to use what the emulator cannot run.
        appended.push(host.pvm_kernel_args().map_err(|e| BuildError::Vcpu(0, e))?);
    }
    let ram_slots = u32::try_from(ram.len()).map_err(|e| BuildError::Boot(e.to_string()))?;
    appended.push(config.platform(ram_slots)?.0.cmdline_entries());
    let appended = appended
        .iter()
        .filter(|a| !a.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let cmdline_len = loader::load_cmdline_with(mem, &cmdline, &appended, limit)?;
    if !appended.is_empty() {
        cmdline = format!("{cmdline} {appended}");
    }

    let boot = |e: &dyn std::fmt::Display| BuildError::Boot(e.to_string());
    let info = boot_params::BootInfo {
        setup_header: kernel.setup_header,
        cmdline_len,
        initrd,
    };
    boot_params::write_zero_page(mem, &boot_params::build_zero_page(&info, ram))
        .map_err(|e| boot(&e))?;
    gdt::write_gdt_and_tss(mem).map_err(|e| boot(&e))?;
    let cr3 = paging::write_identity_map(mem, layout::LINUX_PAGE_TABLES, 4, 4, false)
        .map_err(|e| boot(&e))?;
    debug_assert_eq!(cr3, layout::LINUX_PAGE_TABLES);
    let cpus = u8::try_from(config.vcpus).map_err(|e| boot(&e))?;
    mptable::setup_mptable(mem, cpus).map_err(|e| boot(&e))?;
    Ok(LinuxImage {
        entry: kernel.entry,
        cmdline,
    })
}

/// Builds the VM around RAM that holds `image`.
pub(super) fn assemble(
    config: &LinuxConfig,
    ram: GuestRam,
    image: &LinuxImage,
    resources: VmResources,
) -> Result<BuiltVm, BuildError> {
    let host = resources.host;
    let mut sharing = SharingScanner::new(&ram, Vec::new());
    let mem = ram.memory().clone();
    // With `map=on`, the guest pages the disk maps from its base, for the sharing accounting.
    let mapped = config.disk.as_ref().filter(|d| d.map).map(|_| {
        use vm_memory::GuestMemoryBackend;
        let top = mem.last_addr().0.saturating_add(1);
        let pages = Arc::new(mirrorball_devices::virtio_blk::map::MappedPages::new(top));
        sharing.set_disk_pages(pages.clone());
        pages
    });
    let mut vm = Vm::new(&host, ram, true)?;
    let (_, platform) = config.platform(vm.ram_slots())?;

    let mut mmio = Bus::new();
    let mut profiler = None;
    if let (Some(period), Some((slot, window))) = (config.profile_period, platform.profiler) {
        let request = RegionRequest {
            vm_name: resources.name.clone(),
            kind: "linux",
            vcpus: config.vcpus,
            tasks: None,
            period,
        };
        let regions = publish_profiler_regions(&mut vm, &host, slot, &request)?;
        let device = ProfilerDeviceConfig {
            shm_guest_base: PROFILER_REGION_GPA,
            shm_len: regions.guest.len() as u64,
            vcpu_count: u32::try_from(config.vcpus).unwrap_or(u32::MAX),
            default_period_ns: u64::try_from(period.as_nanos()).unwrap_or(u64::MAX),
            host_region_id: regions.id,
            abi_version: (ABI_VERSION_MAJOR, ABI_VERSION_MINOR),
        };
        let (control, device) = add_profiler_device(&vm, &mut mmio, window, device)?;
        profiler = Some((regions, period, control, device));
    }
    let disk = match (&config.disk, platform.disk) {
        (Some(spec), Some(window)) => Some(add_disk_device(
            &vm,
            &mut mmio,
            window,
            spec,
            &mem,
            &resources.name,
            mapped,
        )?),
        _ => None,
    };
    let (console_out, console) = resources.console.open()?;
    let mut devices = LegacyDevices::new(&vm, console_out, mmio)?;
    devices.profiler = profiler.as_ref().map(|p| p.3.clone());
    let (disk, disk_device) = disk.unzip();
    devices.disk = disk_device;
    let exits = devices.exit_handler()?;
    let control = Arc::new(VmControl::new(config.vcpus).map_err(BuildError::EventFd)?);
    let mut vcpus = Vec::with_capacity(config.vcpus);
    for index in 0..config.vcpus {
        let fd = vm.create_vcpu(index)?;
        configure_cpuid(&host, &fd, index, config.vcpus)?;
        msr::setup_msrs(&fd).map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        lapic::setup_lint(&fd).map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        if index == 0 {
            // The others wait for the boot CPU's INIT/SIPI in the in-kernel local APIC.
            let entry = regs::EntryState::Linux { rip: image.entry };
            regs::set_entry_state(&fd, entry, layout::LINUX_PAGE_TABLES)
                .map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        }
        let handler: Arc<dyn ExitHandler> = exits.clone();
        vcpus.push(Vcpu::new(index, fd, handler, control.clone(), mem.clone()));
    }
    let profiling = profiler.map(|(regions, period, control, _)| {
        let p = Profiling::new(regions, &mut vcpus, period, Some(control.clone()));
        // The driver announces task switches through the device's switch doorbell.
        control.set_switch_sink(p.switches.clone());
        p
    });
    Ok(BuiltVm {
        name: resources.name,
        vm,
        vcpus,
        control,
        exits,
        guest: Guest::Linux {
            devices,
            cmdline: image.cmdline.clone(),
            boot_files: (config.kernel.clone(), config.initrd.clone()),
            console,
            disk,
        },
        host: host.kind(),
        profiling,
        sharing,
    })
}
