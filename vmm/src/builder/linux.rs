//! Builds a VM that boots a Linux kernel through the 64-bit boot protocol: kernel, initramfs and
//! command line in memory, zero page with the e820 map, MP table for the vCPUs, in-kernel
//! interrupt chips, serial console and i8042.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mirrorball_devices::bus::Bus;
use mirrorball_devices::serial::SerialWriter;
use mirrorball_devices::ProfilerDeviceConfig;
use mirrorball_profiler::kvm_stats::StatsFd;
use mirrorball_profiler_abi::{ABI_VERSION_MAJOR, ABI_VERSION_MINOR};
use mirrorball_workload::PROFILER_REGION_GPA;

use crate::arch::x86_64::cpuid::{pvm_guest_kernel_args, HostKind};
use crate::arch::x86_64::{boot_params, gdt, lapic, layout, mptable, msr, paging, regs};
use crate::devices::{add_profiler_device, LegacyDevices};
use crate::loader::{self, DEFAULT_CMDLINE};
use crate::profiling::regions::ProfilerRegions;
use crate::profiling::sampler::{AttributionMode, SampledVcpu, TaskSwitches};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{ExitHandler, Vcpu, VmControl};
use crate::vstate::vm::Vm;

use super::{check_vcpus, configure_cpuid, BuildError, BuiltVm, Guest, Profiling};

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
    /// Where the profiler regions are published.
    pub run_dir: PathBuf,
}

/// Builds the VM; guest serial output goes to `console`.
pub fn build(config: &LinuxConfig, console: SerialWriter) -> Result<BuiltVm, BuildError> {
    check_vcpus(config.vcpus, usize::from(mptable::MAX_CPUS))?;
    let host = HostKind::detect();
    let vm = Vm::new(GuestRam::new(config.mem_bytes)?, true)?;
    let mem = vm.ram().memory();
    let ram = vm.ram().ranges().to_vec();
    let low_end = boot_params::low_ram_end(&ram);

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

    let mut mmio = Bus::new();
    let mut profiler = None;
    if let Some(period) = config.profile_period {
        let ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        let regions = ProfilerRegions::create(&config.run_dir, config.vcpus as u32, "linux", ns)?;
        let len = regions.guest.len() as u64;
        // SAFETY: the mapping lives in `regions`, kept in the BuiltVm's `profiling` for as long
        // as the VM.
        unsafe {
            vm.add_memslot(
                vm.ram_slots(),
                PROFILER_REGION_GPA,
                regions.guest.host_addr(),
                len,
            )?
        };
        let device = ProfilerDeviceConfig {
            shm_guest_base: PROFILER_REGION_GPA,
            shm_len: len,
            vcpu_count: config.vcpus as u32,
            default_period_ns: ns,
            host_region_id: regions.id,
            abi_version: (ABI_VERSION_MAJOR, ABI_VERSION_MINOR),
        };
        let (control, param) = add_profiler_device(&vm, &mut mmio, device)?;
        profiler = Some((Arc::new(regions), period, control, param));
    }
    let devices = LegacyDevices::new(&vm, console, mmio)?;
    let exits = devices.exit_handler();
    let control = Arc::new(VmControl::new(config.vcpus).map_err(BuildError::EventFd)?);
    let mut vcpus = Vec::with_capacity(config.vcpus);
    let mut sampled = Vec::with_capacity(config.vcpus);
    let mut guest_cpuid = None;
    for index in 0..config.vcpus {
        let fd = vm.create_vcpu(index)?;
        let seen = configure_cpuid(&vm, &fd, index, config.vcpus, host)?;
        guest_cpuid.get_or_insert(seen);
        msr::setup_msrs(&fd).map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        lapic::setup_lint(&fd).map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        if index == 0 {
            // The others wait for the boot CPU's INIT/SIPI in the in-kernel local APIC.
            let entry = regs::EntryState::Linux { rip: kernel.entry };
            regs::set_entry_state(&fd, entry, layout::LINUX_PAGE_TABLES)
                .map_err(|e| BuildError::Vcpu(index, e.to_string()))?;
        }
        let handler: Arc<dyn ExitHandler> = exits.clone();
        let mut vcpu = Vcpu::new(index, fd, handler, control.clone(), mem.clone());
        if let Some((regions, ..)) = &profiler {
            let stats = StatsFd::for_vcpu(vcpu.fd()).ok();
            let s = SampledVcpu::new(index, stats, vcpu.tid_handle(), regions.clone());
            vcpu.set_on_start(s.start_hook());
            vcpu.set_on_stop(s.stop_hook());
            sampled.push(s);
        }
        vcpus.push(vcpu);
    }

    let mut appended = String::new();
    if let (HostKind::Pvm, Some(seen)) = (host, &guest_cpuid) {
        // PVM restores host features that KVM_SET_CPUID2 hid, so the guest kernel must be told
        // on its command line not to use what the emulator cannot run.
        if !cmdline.contains("clearcpuid=") {
            appended = pvm_guest_kernel_args(seen).args;
        }
    }
    if let Some((_, _, _, param)) = &profiler {
        appended = format!("{appended} {param}").trim().to_string();
    }
    if !appended.is_empty() {
        cmdline = format!("{cmdline} {appended}");
    }
    let cmdline_len = loader::load_cmdline(mem, &cmdline, limit)?;

    let boot = |e: &dyn std::fmt::Display| BuildError::Boot(e.to_string());
    let info = boot_params::BootInfo {
        setup_header: kernel.setup_header,
        cmdline_len,
        initrd,
    };
    boot_params::write_zero_page(mem, &boot_params::build_zero_page(&info, &ram))
        .map_err(|e| boot(&e))?;
    gdt::write_gdt_and_tss(mem).map_err(|e| boot(&e))?;
    let cr3 = paging::write_identity_map(mem, layout::LINUX_PAGE_TABLES, 4, 4, false)
        .map_err(|e| boot(&e))?;
    debug_assert_eq!(cr3, layout::LINUX_PAGE_TABLES);
    mptable::setup_mptable(mem, config.vcpus as u8).map_err(|e| boot(&e))?;

    Ok(BuiltVm {
        vm,
        vcpus,
        control,
        exits,
        guest: Guest::Linux { devices, cmdline },
        host,
        profiling: profiler.map(|(regions, period, control, _)| {
            // The driver announces task switches through the device's switch doorbell.
            let switches = Arc::new(TaskSwitches::new(&sampled));
            control.set_switch_sink(switches.clone());
            Profiling {
                regions,
                vcpus: sampled,
                period,
                control: Some(control),
                switches,
                attribution: AttributionMode::default(),
            }
        }),
    })
}
