//! What every VM of one process shares: the `/dev/kvm` handle, the host kind, the run directory
//! where profiler regions are published, what KVM supports (read once), and the host's memory
//! policy (KSM), and VMs created ahead for a launch. A process hosting many VMs builds one [`HostContext`] and hands it to the
//! builder for each VM; nothing here is per VM, and nothing is process-global.
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};

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
    supported_cpuid: OnceLock<Result<CpuId, String>>,
    pvm_kernel_args: OnceLock<Result<String, String>>,
    /// VM file descriptors a helper thread creates ahead ([`HostContext::create_vms_ahead`]).
    vms_ahead: Mutex<Option<Receiver<VmFd>>>,
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
            supported_cpuid: OnceLock::new(),
            pvm_kernel_args: OnceLock::new(),
            vms_ahead: Mutex::new(None),
        })
    }

    /// Has a helper thread create `count` VMs (`KVM_CREATE_VM`) ahead, while this thread goes
    /// on preparing a launch: [`HostContext::create_vm`] hands them out. The kernel's part of a
    /// VM's creation is most of a clone's setup cost, and it needs nothing from the launch.
    pub fn create_vms_ahead(&self, count: usize) {
        let (tx, rx) = std::sync::mpsc::sync_channel(count);
        let kvm = self.kvm.clone();
        let spawned = std::thread::Builder::new()
            .name("vm-create".into())
            .spawn(move || {
                for _ in 0..count {
                    // A VM that cannot be created here is created (and its error reported) by
                    // the build that needs it.
                    let Ok(fd) = kvm.create_vm() else { break };
                    if tx.send(fd).is_err() {
                        break;
                    }
                }
            });
        if spawned.is_ok() {
            *self.vms_ahead.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        }
    }

    /// A new VM: one created ahead while any is left, else created now.
    pub fn create_vm(&self) -> Result<VmFd, kvm_ioctls::Error> {
        let mut ahead = self.vms_ahead.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = ahead.as_ref() {
            match rx.recv() {
                Ok(fd) => return Ok(fd),
                Err(_) => *ahead = None,
            }
        }
        drop(ahead);
        self.kvm.create_vm()
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
        self.supported_cpuid
            .get_or_init(|| {
                self.kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))
            })
            .clone()
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
