//! Taking a snapshot of a running VM: pause it (if it runs), have each parked vCPU thread read
//! its own state, read the VM-wide KVM state and the devices' (Linux guests), write the memory,
//! the profiler's guest region, the disk's overlay (`snapshot::disk`) and the state file, then
//! resume it if it ran before. The VM is paused for the whole write; the reply says how long. On
//! any failure (a read-only or full file system included) the files written are removed, and the
//! directory too when the request created it, and the VM goes on as before (resumed if it ran).
//! Requests are served from the event loop one after another, so a `stop` that arrives while a
//! snapshot is written is handled after it: the snapshot completes, then the VM ends.
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::builder::Guest;
use crate::snapshot::state::{
    DeviceStates, FileFacts, HostFacts, LinuxBoot, SnapshotState, VmConfig, FORMAT, VERSION,
};
use crate::snapshot::vcpu::{capture, VcpuState};
use crate::snapshot::{self, machine, memory, GUEST_REGION_FILE, MEMORY_FILE};

use super::RunningVm;

/// Longest a snapshot waits for the vCPUs to park and to report their state.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

type Slot = Arc<Mutex<Option<Result<VcpuState, String>>>>;

impl RunningVm {
    /// Writes a snapshot of the VM into `dir`; returns figures for the reply.
    pub fn snapshot_to(&mut self, dir: &Path) -> Result<serde_json::Value, String> {
        if !dir.is_absolute() {
            return Err(format!(
                "snapshot directory {} is not absolute",
                dir.display()
            ));
        }
        let created = snapshot::prepare_dir(dir).map_err(|e| e.to_string())?;
        let was_running = !self.control.pause_requested();
        let started = Instant::now();
        let result = self.pause_and_write(dir, started);
        let pause_ms = started.elapsed().as_secs_f64() * 1e3;
        if was_running {
            self.resume();
        }
        match result {
            Ok(mut detail) => {
                detail["pause_ms"] = pause_ms.into();
                Ok(detail)
            }
            Err(e) => {
                snapshot::remove_partial(dir, created);
                Err(e)
            }
        }
    }

    fn pause_and_write(
        &mut self,
        dir: &Path,
        started: Instant,
    ) -> Result<serde_json::Value, String> {
        let running = self.running.as_ref().ok_or("the VM is not running")?;
        let paused = running.pause(SNAPSHOT_WAIT);
        let count = running.count();
        self.publish_paused();
        if !paused {
            return Err(format!("the VM did not pause within {SNAPSHOT_WAIT:?}"));
        }
        if self.control.running_vcpus() != count {
            return Err(
                "a vCPU of the VM has stopped: only VMs whose vCPUs all run can be \
                        snapshotted"
                    .into(),
            );
        }
        let vcpus = self.capture_vcpus(count)?;
        let linux = self.capture_linux()?;
        let ram = self.vm.ram();
        let mem_file = snapshot::create_file(dir, MEMORY_FILE)?;
        let written = memory::write(ram, &mem_file)
            .map_err(|e| format!("cannot write {}: {e}", dir.join(MEMORY_FILE).display()))?;
        let guest_region = self.write_guest_region(dir)?;
        let (guest, specs, workload) = match &self.guest {
            Guest::Workload { monitor, specs, .. } => (
                "workload",
                specs.iter().map(ToString::to_string).collect(),
                Some(monitor.progress()),
            ),
            Guest::Linux { .. } => ("linux", Vec::new(), None),
        };
        let (linux, machine, devices) = match linux {
            Some((boot, machine, devices)) => (Some(boot), Some(machine), Some(devices)),
            None => (None, None, None),
        };
        let disk = self.save_disk(dir)?;
        let disk_detail = disk.as_ref().map(|d| {
            serde_json::json!({
                "base": d.base.path.display().to_string(),
                "overlay_blocks": d.overlay.blocks,
                "overlay_allocated_bytes": snapshot::allocated_bytes(&dir.join(&d.overlay.file)),
            })
        });
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open KVM: {e}"))?;
        let state = SnapshotState {
            format: FORMAT.into(),
            version: VERSION,
            vm: VmConfig {
                guest: guest.into(),
                specs,
                vcpus: count,
                mem_bytes: ram.size(),
                profile_period_ns: self.sampler.as_ref().map(|(_, r)| r.period_ns),
                name: self.name.clone(),
            },
            host: HostFacts {
                kind: self.host.name().into(),
                kvm_api_version: kvm.get_api_version(),
            },
            vcpus,
            workload,
            memory: FileFacts {
                file: MEMORY_FILE.into(),
                bytes: ram.size(),
                pages: written.pages,
                crc32: written.crc,
            },
            guest_region,
            pause_ms: started.elapsed().as_secs_f64() * 1e3,
            uptime_ms: self.uptime().as_secs_f64() * 1e3,
            linux,
            machine,
            devices,
            disk,
        };
        let state_bytes = snapshot::write_state(dir, &state).map_err(|e| e.to_string())?;
        let mut detail = serde_json::json!({
            "dir": dir.display().to_string(),
            "memory_bytes": ram.size(),
            "memory_pages_written": written.pages,
            "memory_allocated_bytes": snapshot::allocated_bytes(&dir.join(MEMORY_FILE)),
            "state_bytes": state_bytes,
        });
        if let Some(disk) = disk_detail {
            detail["disk"] = disk;
        }
        Ok(detail)
    }

    /// A Linux guest's boot record, VM-wide KVM state and devices (`None` for the workload).
    fn capture_linux(
        &self,
    ) -> Result<Option<(LinuxBoot, machine::MachineState, DeviceStates)>, String> {
        let Guest::Linux {
            devices,
            cmdline,
            boot_files,
            ..
        } = &self.guest
        else {
            return Ok(None);
        };
        let boot = LinuxBoot {
            kernel: boot_files.0.display().to_string(),
            initrd: boot_files.1.as_ref().map(|p| p.display().to_string()),
            cmdline: cmdline.clone(),
        };
        let machine = machine::capture(self.vm.fd())?;
        Ok(Some((boot, machine, devices.state()?)))
    }

    /// Saves a Linux guest's disk overlay into `dir` (the vCPUs parked: no request runs, see
    /// `VirtioMmio::<VirtioBlk>::blk_state`).
    fn save_disk(&self, dir: &Path) -> Result<Option<snapshot::disk::DiskSnapshot>, String> {
        let Guest::Linux {
            devices:
                crate::devices::LegacyDevices {
                    disk: Some(device), ..
                },
            ..
        } = &self.guest
        else {
            return Ok(None);
        };
        let device = device.lock().unwrap_or_else(|p| p.into_inner());
        let blk = device.backend();
        snapshot::disk::save(dir, blk.disk(), blk.maps()).map(Some)
    }

    /// Has every parked vCPU thread read its own state.
    fn capture_vcpus(&self, count: usize) -> Result<Vec<VcpuState>, String> {
        let msr_list = kvm_ioctls::Kvm::new()
            .and_then(|k| k.get_msr_index_list())
            .map(|l| l.as_slice().to_vec())
            .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
        let irqchip = self.vm.has_irqchip();
        let slots: Vec<Slot> = (0..count).map(|_| Arc::default()).collect();
        for (index, slot) in slots.iter().enumerate() {
            let (slot, msr_list) = (slot.clone(), msr_list.clone());
            self.control.queue_job(
                index,
                Box::new(move |fd| {
                    let state = capture(fd, irqchip, &msr_list);
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
                }),
            );
        }
        let deadline = Instant::now() + SNAPSHOT_WAIT;
        let mut states = Vec::with_capacity(count);
        for (index, slot) in slots.iter().enumerate() {
            loop {
                if let Some(state) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    states.push(state.map_err(|e| format!("vCPU {index}: {e}"))?);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!("vCPU {index} did not report its state"));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(states)
    }

    fn write_guest_region(&self, dir: &Path) -> Result<Option<FileFacts>, String> {
        let Some((_, regions)) = &self.sampler else {
            return Ok(None);
        };
        let region = &regions.guest;
        // SAFETY: the guest region mapping is alive while `regions` is; the vCPUs are parked,
        // so the guest does not write it while it is copied.
        let bytes =
            unsafe { std::slice::from_raw_parts(region.host_addr().cast_const(), region.len()) }
                .to_vec();
        let mut f = snapshot::create_file(dir, GUEST_REGION_FILE)?;
        std::io::Write::write_all(&mut f, &bytes)
            .map_err(|e| format!("cannot write {GUEST_REGION_FILE}: {e}"))?;
        Ok(Some(FileFacts {
            file: GUEST_REGION_FILE.into(),
            bytes: bytes.len() as u64,
            pages: bytes.len().div_ceil(4096) as u64,
            crc32: crc32fast::hash(&bytes),
        }))
    }
}
