//! Restoring a snapshot directory as clones: [`load`] reads and checks it once (state checksum,
//! format, version, host, memory file and its checksum), [`launch`] builds and starts N VMs whose
//! RAM is a copy-on-write clone of `memory.bin` (the template mechanism of `vstate::memory`),
//! each with its own name, profiler regions and console, and writes the saved vCPU and device
//! state into each before its vCPUs first run. A disk VM's clones read the snapshot's base image
//! (refused if missing or changed) through the snapshot's overlay, a layer all clones share
//! read-only, under an overlay of their own in memory (`super::disk`). With
//! [`RestoreMemory::Lazy`] each clone's RAM is its own instead, loaded on first touch
//! (`super::lazy`).
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::builder::linux::LinuxImage;
use crate::builder::workload::WorkloadImage;
use crate::builder::{
    BuiltVm, ConsoleSink, Guest, GuestConfig, Image, LazyMemory, LinuxConfig, MemorySource,
    SharedImage, WorkloadConfig,
};
use crate::fleet::{launcher, FleetPlan};
use crate::host::HostContext;
use crate::profiling::sampler::AttributionMode;
use crate::runner::RunError;
use crate::session::RunningVm;
use crate::vstate::first_slice;
use crate::vstate::memory::Template;
use crate::workload::{self, TaskSpec};

use super::state::{self, SnapshotState};
use super::{machine, memory, vcpu, SnapshotError, CHECKSUM_FILE, STATE_FILE};

/// Bytes of a guest region header (the VMM formats it; restores keep the new VM's own).
const REGION_HEADER: usize = 256;
/// Offset of `guest_boot_id` in the guest region header (the guest writes it).
const GUEST_BOOT_ID: usize = 120;

/// A snapshot read and checked, ready to clone.
pub struct Loaded {
    /// The state file.
    pub state: SnapshotState,
    /// The VM configuration it describes.
    pub config: GuestConfig,
    shared: Arc<SharedImage>,
    guest_region: Option<Vec<u8>>,
}

/// Opens the snapshot file `name` in `dir` for reading: never through a symlink, never blocking
/// (a FIFO planted in its place would block the open until a writer came), and only a regular
/// file.
pub(super) fn open_read(dir: &Path, name: &str) -> Result<File, SnapshotError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(dir.join(name))
        .map_err(|e| SnapshotError::new(dir, format!("cannot open {name}: {e}")))?;
    match file.metadata() {
        Ok(meta) if meta.is_file() => Ok(file),
        Ok(_) => Err(SnapshotError::new(
            dir,
            format!("{name} is not a regular file"),
        )),
        Err(e) => Err(SnapshotError::new(dir, format!("cannot read {name}: {e}"))),
    }
}

fn read_small(dir: &Path, name: &str, limit: u64) -> Result<Vec<u8>, SnapshotError> {
    let mut bytes = Vec::new();
    open_read(dir, name)?
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| SnapshotError::new(dir, format!("cannot read {name}: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(SnapshotError::new(dir, format!("{name} is too large")));
    }
    Ok(bytes)
}

/// The guest configuration a state file describes, for the snapshot in `dir`. A Linux guest's
/// kernel and initramfs are already in the snapshot's memory: its configuration names the
/// memory file as its "kernel" (nothing is loaded from it; the clones' template key and the
/// check that the file exists use it), so a restore needs neither of the original files. Its
/// disk's base image and the snapshot's overlay are opened and checked here, before a restore
/// creates anything.
pub fn config_of(state: &SnapshotState, dir: &Path) -> Result<GuestConfig, String> {
    if let Some(linux) = &state.linux {
        let config = GuestConfig::Linux(LinuxConfig {
            kernel: dir.join(&state.memory.file),
            initrd: None,
            cmdline: Some(linux.cmdline.clone()),
            mem_bytes: state.vm.mem_bytes,
            vcpus: state.vm.vcpus,
            profile_period: state.vm.profile_period_ns.map(Duration::from_nanos),
            disk: state
                .disk
                .as_ref()
                .map(|d| super::disk::spec(dir, d))
                .transpose()?,
        });
        config.check().map_err(|e| e.to_string())?;
        return Ok(config);
    }
    let specs = state
        .vm
        .specs
        .iter()
        .map(|s| s.parse::<TaskSpec>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let config = GuestConfig::Workload(WorkloadConfig {
        specs,
        vcpus: state.vm.vcpus,
        mem_bytes: Some(state.vm.mem_bytes),
        profile_period: state.vm.profile_period_ns.map(Duration::from_nanos),
    });
    config.check().map_err(|e| e.to_string())?;
    Ok(config)
}

fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let err = |why: String| SnapshotError::new(dir, why);
    let meta = std::fs::metadata(dir).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    let checksum = read_small(dir, CHECKSUM_FILE, 4096)?;
    let bytes = read_small(dir, STATE_FILE, state::MAX_STATE_BYTES)?;
    state::parse(&bytes, &String::from_utf8_lossy(&checksum)).map_err(err)
}

/// The guest configuration of the snapshot in `dir` (its state file checked; the rest is
/// checked by [`load`]).
pub fn read_config(dir: &Path) -> Result<GuestConfig, SnapshotError> {
    config_of(&read_state(dir)?, dir).map_err(|e| SnapshotError::new(dir, e))
}

/// Reads and checks the snapshot in `dir` for restoring on `host`.
pub fn load(dir: &Path, host: &HostContext) -> Result<Loaded, SnapshotError> {
    let err = |why: String| SnapshotError::new(dir, why);
    let state = read_state(dir)?;
    let kind = host.kind().name();
    if state.host.kind != kind {
        return Err(err(format!(
            "taken on a {} KVM host, this host is {kind}",
            state.host.kind
        )));
    }
    let api = host.kvm().get_api_version();
    if state.host.kvm_api_version != api {
        return Err(err(format!(
            "taken with KVM API version {}, this host has {api}",
            state.host.kvm_api_version
        )));
    }
    let config = config_of(&state, dir).map_err(err)?;
    let mem = open_read(dir, &state.memory.file)?;
    let size = mem.metadata().map_err(|e| err(e.to_string()))?.len();
    if size != state.memory.bytes {
        return Err(err(format!(
            "{} has {size} bytes, the state says {} (truncated?)",
            state.memory.file, state.memory.bytes
        )));
    }
    let found = memory::verify(&mem, size).map_err(|e| err(e.to_string()))?;
    if (found.pages, found.crc) != (state.memory.pages, state.memory.crc32) {
        return Err(err(format!(
            "{} does not match its checksum (corrupted)",
            state.memory.file
        )));
    }
    let guest_region = match &state.guest_region {
        Some(f) => {
            let bytes = read_small(dir, &f.file, 1 << 30)?;
            if bytes.len() as u64 != f.bytes || crc32fast::hash(&bytes) != f.crc32 {
                return Err(err(format!("{} does not match its checksum", f.file)));
            }
            Some(bytes)
        }
        None => None,
    };
    let template = Template::from_file(mem, size).map_err(|e| err(e.to_string()))?;
    let image = match (&config, &state.linux) {
        (GuestConfig::Workload(c), _) => Image::Workload(WorkloadImage {
            plan: workload::layout(&c.specs, c.vcpus).map_err(|e| err(e.to_string()))?,
            entry: mirrorball_workload::IMAGE_GPA,
        }),
        (GuestConfig::Linux(_), Some(linux)) => Image::Linux(LinuxImage {
            // The saved registers say where the guest is; the entry point is not used.
            entry: 0,
            cmdline: linux.cmdline.clone(),
        }),
        (GuestConfig::Linux(_), None) => return Err(err("no Linux boot state".into())),
    };
    let shared = SharedImage::prepared(Arc::new(template), image, &config)
        .map_err(|e| err(e.to_string()))?;
    Ok(Loaded {
        state,
        config,
        shared: Arc::new(shared),
        guest_region,
    })
}

/// Whether the CPU this host gives a clone's vCPUs has every feature the snapshot's guest saw.
pub fn check_cpuid(loaded: &Loaded, built: &BuiltVm) -> Result<(), String> {
    for (i, (v, saved)) in built.vcpus.iter().zip(&loaded.state.vcpus).enumerate() {
        let now = vcpu::guest_cpuid(v.fd())?;
        if let Some(missing) = vcpu::missing_features(&saved.cpuid, &now) {
            return Err(format!(
                "this host lacks CPU features the snapshot's guest saw on vCPU {i}: {missing}"
            ));
        }
    }
    Ok(())
}

/// Writes the snapshot's vCPU and device state into a freshly built clone.
pub fn apply(loaded: &Loaded, built: &mut BuiltVm) -> Result<(), String> {
    check_cpuid(loaded, built)?;
    for (i, (v, saved)) in built.vcpus.iter().zip(&loaded.state.vcpus).enumerate() {
        vcpu::apply(v.fd(), saved).map_err(|e| format!("vCPU {i}: {e}"))?;
    }
    match (&built.guest, &loaded.state) {
        (
            Guest::Workload { monitor, .. },
            SnapshotState {
                workload: Some(progress),
                ..
            },
        ) => {
            monitor.restore_progress(progress);
        }
        (
            Guest::Linux { devices, .. },
            SnapshotState {
                machine: Some(m),
                devices: Some(saved),
                ..
            },
        ) => {
            machine::apply_chips(built.vm.fd(), m)?;
            // After the chips: an interrupt a device raises again lands on the restored ones.
            devices.restore(saved)?;
        }
        (Guest::Linux { .. }, _) => return Err("the snapshot has no Linux machine state".into()),
        _ => {}
    }
    if let (Some(p), Some(saved)) = (&built.profiling, &loaded.guest_region) {
        let region = &p.regions.guest;
        if region.len() != saved.len() {
            return Err(format!(
                "the profiler's guest region has {} bytes, the snapshot's {}",
                region.len(),
                saved.len()
            ));
        }
        let dst = region.host_addr();
        // SAFETY: `dst` maps the new VM's guest region of `region.len()` bytes, alive while
        // `p.regions` is; no vCPU runs yet. The VMM-formatted header is kept, the guest's own
        // boot id and everything after the header are carried over.
        unsafe {
            std::ptr::copy_nonoverlapping(
                saved.as_ptr().add(GUEST_BOOT_ID),
                dst.add(GUEST_BOOT_ID),
                8,
            );
            std::ptr::copy_nonoverlapping(
                saved.as_ptr().add(REGION_HEADER),
                dst.add(REGION_HEADER),
                saved.len().saturating_sub(REGION_HEADER),
            );
        }
    }
    if let Some(m) = &loaded.state.machine {
        machine::apply_clock(built.vm.fd(), m)?;
    }
    Ok(())
}

/// `config` with its disk's share of the mapping budget (`map=on`) set for the VMs of `plan`
/// (as many as the plan's own configuration says, at least the plan's VMs).
fn with_map_share(config: &GuestConfig, plan: &FleetPlan) -> GuestConfig {
    let mut config = config.clone();
    let planned = plan.vms.first().and_then(|vm| match &vm.config {
        GuestConfig::Linux(l) => l.disk.as_ref().map(|d| d.map_vms),
        GuestConfig::Workload(_) => None,
    });
    if let GuestConfig::Linux(LinuxConfig {
        disk: Some(disk), ..
    }) = &mut config
    {
        disk.map_vms = planned.unwrap_or(1).max(plan.vms.len());
    }
    config
}

/// How restored clones get their memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum RestoreMemory {
    /// Each maps `memory.bin` copy-on-write: all share its pages until they write.
    #[default]
    Shared,
    /// Each has memory of its own, loaded from `memory.bin` on first touch (`super::lazy`).
    Lazy,
}

/// A clone started, or why it could not be.
pub type Started = Result<RunningVm, (String, RunError)>;

/// Builds and starts the VMs of `plan` (copies of the snapshot's configuration) as clones of
/// `loaded`, on two CPUs (`fleet::launcher`), each given the snapshot's state and parked, then
/// all let go together. A host whose CPU lacks what the snapshot's guest saw refuses the
/// snapshot as a whole (checked on the first clone, built before any other); other failures
/// refuse one clone alone.
pub fn launch(
    dir: &Path,
    loaded: &Arc<Loaded>,
    plan: &FleetPlan,
    consoles: Vec<ConsoleSink>,
    host: &Arc<HostContext>,
    attribution: AttributionMode,
    memory: RestoreMemory,
) -> Result<Vec<Started>, SnapshotError> {
    let config = with_map_share(&loaded.config, plan);
    let source = match memory {
        RestoreMemory::Shared => MemorySource::Template(loaded.shared.clone()),
        RestoreMemory::Lazy => {
            let loader = loaded
                .shared
                .template
                .file()
                .try_clone()
                .and_then(super::lazy::LazyLoader::start)
                .map_err(|e| SnapshotError::new(dir, format!("lazy restore: {e}")))?;
            MemorySource::Lazy(Arc::new(LazyMemory {
                image: loaded.shared.clone(),
                loader,
            }))
        }
    };
    let mut started: Vec<Option<Started>> = Vec::with_capacity(plan.vms.len());
    let mut jobs = Vec::with_capacity(plan.vms.len());
    for (index, (vm, console)) in plan.vms.iter().zip(consoles).enumerate() {
        started.push(None);
        let mut work = launcher::Work::Build {
            config: config.clone(),
            console,
            memory: Ok(source.clone()),
        };
        if index == 0 {
            match work.into_built(&vm.name, host) {
                Ok(first) => {
                    check_cpuid(loaded, &first).map_err(|e| SnapshotError::new(dir, e))?;
                    work = launcher::Work::Built(Box::new(first));
                }
                Err(e) => {
                    started[index] = Some(Err((vm.name.clone(), RunError::Build(e))));
                    continue;
                }
            }
        }
        jobs.push(launcher::Job {
            index,
            name: vm.name.clone(),
            work,
        });
    }
    let state = Arc::clone(loaded);
    let prepare: launcher::Prepare = Arc::new(move |built: &mut BuiltVm| apply(&state, built));
    let gate = Arc::new(first_slice::StartGate::default());
    for (index, launched) in
        launcher::build_and_start(jobs, host, &gate, attribution, Some(prepare))
    {
        if let Some(slot) = started.get_mut(index) {
            *slot = Some(launched);
        }
    }
    gate.open();
    Ok(started
        .into_iter()
        .zip(&plan.vms)
        .map(|(s, vm)| s.unwrap_or_else(|| Err((vm.name.clone(), RunError::NotRun))))
        .collect())
}
