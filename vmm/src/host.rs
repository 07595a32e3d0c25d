//! What every VM of one process shares: the `/dev/kvm` handle, the host kind, the run directory
//! where profiler regions are published, what KVM supports (read once), and the host's memory
//! policy (KSM), and VMs created ahead for a launch. A process hosting many VMs builds one [`HostContext`] and hands it to the
//! builder for each VM; nothing here is per VM, and nothing is process-global.
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::arch::x86_64::cpuid::{self, pvm_guest_kernel_args, HostKind};
use crate::vstate::vm::VmError;

/// Shared by all VMs of a process.
pub struct HostContext {
    kvm: Arc<Kvm>,
    kind: HostKind,
    run_dir: PathBuf,
    ksm: bool,
    private_ram: bool,
    pager: Option<Arc<crate::budget::uffd::Pager>>,
    /// Shared with the helper thread, which reads it when it creates vCPUs.
    supported_cpuid: Arc<OnceLock<Result<CpuId, String>>>,
    pvm_kernel_args: OnceLock<Result<String, String>>,
    /// VMs a helper thread creates ahead ([`HostContext::create_vms_ahead`]).
    vms_ahead: Mutex<Option<Receiver<VmAhead>>>,
    /// The helper thread, joined on drop.
    ahead_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A VM created ahead: its file descriptor and, for a VM without the in-kernel irqchip, its
/// vCPUs (TSS and identity-map addresses set, each vCPU's CPUID set for `cpuid_for` vCPUs).
pub struct VmAhead {
    /// The VM.
    pub fd: VmFd,
    /// Its vCPUs by id (empty: none created, nothing set).
    pub vcpus: Vec<VcpuFd>,
    /// The vCPU count their CPUID describes.
    pub cpuid_for: usize,
}

impl VmAhead {
    /// Just the VM.
    pub fn plain(fd: VmFd) -> Self {
        Self {
            fd,
            vcpus: Vec::new(),
            cpuid_for: 0,
        }
    }

    /// A VM with `count` vCPUs whose CPUID is set as the builder would set it.
    fn with_vcpus(
        kvm: &Kvm,
        count: usize,
        supported: &CpuId,
        kind: HostKind,
    ) -> Result<Self, String> {
        let fd = kvm.create_vm().map_err(|e| e.to_string())?;
        crate::vstate::vm::set_system_addresses(&fd).map_err(|e| e.to_string())?;
        let vcpus = (0..count)
            .map(|index| {
                let vcpu = fd.create_vcpu(index as u64).map_err(|e| e.to_string())?;
                cpuid::set_guest_cpuid(&vcpu, supported, index, count, kind)?;
                Ok(vcpu)
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            fd,
            vcpus,
            cpuid_for: count,
        })
    }
}

impl HostContext {
    /// Opens `/dev/kvm`; profiler regions go to `run_dir`; with `ksm`, guest memory is offered to
    /// the kernel's same-page merging.
    pub fn new(run_dir: &Path, ksm: bool) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        Ok(Self {
            kvm: Arc::new(kvm),
            kind: HostKind::detect(),
            run_dir: run_dir.to_path_buf(),
            ksm,
            private_ram: false,
            pager: None,
            supported_cpuid: Arc::new(OnceLock::new()),
            pvm_kernel_args: OnceLock::new(),
            vms_ahead: Mutex::new(None),
            ahead_thread: Mutex::new(None),
        })
    }

    /// Has a helper thread create `count` VMs (`KVM_CREATE_VM`) ahead, while this thread goes
    /// on preparing a launch: [`HostContext::create_vm`] hands them out. The kernel's part of a
    /// VM's creation is most of a clone's setup cost, and it needs nothing from the launch.
    ///
    /// With `vcpus`, for VMs without the in-kernel irqchip (the OS-less guest), the helper also
    /// creates that many vCPUs per VM and sets their CPUID (`KVM_SET_CPUID2` is slow on some
    /// hosts: PVM re-reads host CPUID leaves, each a trap to the hypervisor below).
    pub fn create_vms_ahead(&self, count: usize, vcpus: Option<usize>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(count);
        let kvm = self.kvm.clone();
        let kind = self.kind;
        let cell = self.supported_cpuid.clone();
        let builder = std::thread::Builder::new().name("vm-create".into());
        let spawned = crate::placement::spawn_on_another_cpu(builder, move || {
            // Read here (KVM_GET_SUPPORTED_CPUID is slow on PVM), not on the launching thread.
            let supported = vcpus.and_then(|n| Some((n, supported_cpuid_of(&kvm, &cell).ok()?)));
            for _ in 0..count {
                let prepared = supported
                    .as_ref()
                    .and_then(|(n, cpuid)| VmAhead::with_vcpus(&kvm, *n, cpuid, kind).ok());
                // A VM that cannot be created here is created (and its error reported) by
                // the build that needs it.
                let ahead = match prepared {
                    Some(ahead) => ahead,
                    None => match kvm.create_vm() {
                        Ok(fd) => VmAhead::plain(fd),
                        Err(_) => break,
                    },
                };
                if tx.send(ahead).is_err() {
                    break;
                }
            }
        });
        if let Ok(handle) = spawned {
            *self.vms_ahead.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
            let previous = self
                .ahead_thread
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(handle);
            if let Some(previous) = previous {
                // Its receiver was just replaced: it stops at its next VM.
                let _ = previous.join();
            }
        }
    }

    /// A new VM: one created ahead while any is left, else created now.
    pub fn create_vm(&self) -> Result<VmAhead, kvm_ioctls::Error> {
        let mut ahead = self.vms_ahead.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = ahead.as_ref() {
            match rx.recv() {
                Ok(vm) => return Ok(vm),
                Err(_) => *ahead = None,
            }
        }
        drop(ahead);
        self.kvm.create_vm().map(VmAhead::plain)
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
    }

    /// What kind of KVM this is.
    pub fn kind(&self) -> HostKind {
        self.kind
    }

    /// Where profiler regions are published.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Whether guest memory is marked mergeable for KSM.
    pub fn ksm(&self) -> bool {
        self.ksm
    }

    /// Maps fresh guest memory privately (anonymous pages over the memfd). Under a
    /// machine-memory budget (`crate::budget`): with shared memfd pages near a v1 memory
    /// cgroup's limit the VMM was killed by SIGSEGV here, while anonymous pages are swapped out
    /// and in cleanly.
    pub fn set_private_ram(&mut self, private: bool) {
        self.private_ram = private;
    }

    /// Whether fresh guest memory is mapped privately (with KSM or a budget).
    pub fn private_ram(&self) -> bool {
        self.ksm || self.private_ram
    }

    /// Puts the guest memory of every VM built from now on under `pager` (`--pager uffd`).
    pub fn set_pager(&mut self, pager: Arc<crate::budget::uffd::Pager>) {
        self.pager = Some(pager);
    }

    /// The userfaultfd pager of this process's VMs, if any.
    pub fn pager(&self) -> Option<&Arc<crate::budget::uffd::Pager>> {
        self.pager.as_ref()
    }

    /// `KVM_GET_SUPPORTED_CPUID`, read once.
    pub fn supported_cpuid(&self) -> Result<CpuId, String> {
        supported_cpuid_of(&self.kvm, &self.supported_cpuid)
    }

    /// On a PVM host, the kernel parameters (`noxsave clearcpuid=…`) that turn off what the
    /// emulator cannot run, from the CPUID a guest really sees there (PVM puts some host
    /// features back after `KVM_SET_CPUID2`, so a throw-away vCPU is configured and read back,
    /// once per process). Empty elsewhere.
    pub fn pvm_kernel_args(&self) -> Result<String, String> {
        if self.kind != HostKind::Pvm {
            return Ok(String::new());
        }
        self.pvm_kernel_args
            .get_or_init(|| {
                let vm = self
                    .kvm
                    .create_vm()
                    .map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
                let vcpu = vm
                    .create_vcpu(0)
                    .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
                let mut table = self.supported_cpuid()?;
                cpuid::filter_cpuid(&mut table, 0, 1, self.kind)
                    .map_err(|e| format!("CPUID filter: {e}"))?;
                vcpu.set_cpuid2(&table)
                    .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
                let seen = vcpu
                    .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| format!("KVM_GET_CPUID2: {e}"))?;
                Ok(pvm_guest_kernel_args(&seen).args)
            })
            .clone()
    }
}

impl Drop for HostContext {
    fn drop(&mut self) {
        // Without a receiver the helper stops at its next VM.
        self.vms_ahead
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let handle = self
            .ahead_thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// What KVM supports (`KVM_GET_SUPPORTED_CPUID`), read once into `cell`.
fn supported_cpuid_of(kvm: &Kvm, cell: &OnceLock<Result<CpuId, String>>) -> Result<CpuId, String> {
    cell.get_or_init(|| {
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))
    })
    .clone()
}
