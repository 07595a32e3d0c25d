//! The state file `state.json` of a snapshot directory and its checksum file: what a restore
//! needs besides the memory — the VM's configuration, the host it was taken on, every vCPU's
//! state, the VM-wide KVM state and the devices' state of a Linux guest (the workload guest's
//! task progress; the profiler's guest region, in its own file) and the memory file's figures.
//! Parsing is pure and bounded, for fuzzing. Version 2 added Linux guests (version 1 files are
//! refused: their vCPU state lacks XSAVE, debug registers and most MSRs). Version 3 added the
//! copy-on-write disk (`disk`, `devices.blk`); version 2 files, which have neither, are read
//! as before.
use serde::{Deserialize, Serialize};

use super::disk::{self, DiskSnapshot};
use super::machine::{self, MachineState};
use super::vcpu::{self, VcpuState};
use crate::workload::TaskProgress;
use mirrorball_devices::state::{
    BlockDeviceState, I8042State, ProfilerDeviceState, RtcState, SerialState,
};

/// `format` of every state file.
pub const FORMAT: &str = "mirrorball-snapshot";
/// Version this VMM writes.
pub const VERSION: u32 = 3;
/// Oldest version this VMM reads.
pub const OLDEST_VERSION: u32 = 2;
/// Largest state file read.
pub const MAX_STATE_BYTES: u64 = 16 << 20;
/// Most vCPUs a state file may describe.
pub const MAX_VCPUS: usize = 256;

/// The state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] of the writer.
    pub version: u32,
    /// The VM's configuration.
    pub vm: VmConfig,
    /// Where it was taken.
    pub host: HostFacts,
    /// Per vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// The workload guest's per-task progress.
    #[serde(default)]
    pub workload: Option<Vec<TaskProgress>>,
    /// The guest memory file.
    pub memory: FileFacts,
    /// The profiler's guest region (tasks the guest registered), if the VM had one.
    #[serde(default)]
    pub guest_region: Option<FileFacts>,
    /// How long the VM was paused for the snapshot, ms.
    #[serde(default)]
    pub pause_ms: f64,
    /// How long the VM had run (since its vCPUs started) when the snapshot was taken, ms.
    #[serde(default)]
    pub uptime_ms: f64,
    /// A Linux guest's boot configuration.
    #[serde(default)]
    pub linux: Option<LinuxBoot>,
    /// A Linux guest's interrupt chips, PIT and clock.
    #[serde(default)]
    pub machine: Option<MachineState>,
    /// A Linux guest's devices.
    #[serde(default)]
    pub devices: Option<DeviceStates>,
    /// A Linux guest's copy-on-write disk: its base image and overlay (version 3).
    #[serde(default)]
    pub disk: Option<DiskSnapshot>,
}

/// What a Linux guest was booted with (its memory holds the kernel and initramfs already).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxBoot {
    /// The kernel file it was booted from (for the record).
    pub kernel: String,
    /// The initramfs file, if any (for the record).
    #[serde(default)]
    pub initrd: Option<String>,
    /// The command line the kernel got (with what the VMM appended).
    pub cmdline: String,
}

/// The state of a Linux guest's devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialState,
    /// The i8042.
    pub i8042: I8042State,
    /// The CMOS RTC.
    pub rtc: RtcState,
    /// The profiler device, if the VM has one.
    #[serde(default)]
    pub profiler: Option<ProfilerDeviceState>,
    /// The virtio-blk device, if the VM has a disk (version 3).
    #[serde(default)]
    pub blk: Option<BlockDeviceState>,
}

/// What is needed to build the VM again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// `"workload"` or `"linux"`.
    pub guest: String,
    /// The workload's task specs.
    pub specs: Vec<String>,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// Profiler period, ns (`None`: profiler off).
    pub profile_period_ns: Option<u64>,
    /// The VM's name.
    pub name: String,
}

/// Host facts a restore compares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFacts {
    /// KVM host kind (`pvm`, `intel`, `amd`).
    pub kind: String,
    /// `KVM_GET_API_VERSION`.
    pub kvm_api_version: i32,
}

/// A data file of the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFacts {
    /// Its name in the snapshot directory.
    pub file: String,
    /// Its size, bytes.
    pub bytes: u64,
    /// Non-zero pages it holds.
    pub pages: u64,
    /// CRC-32 over (offset, page) of its non-zero pages.
    pub crc32: u32,
}

/// The checksum file's one line for `state` bytes.
pub fn checksum_line(state: &[u8]) -> String {
    format!("crc32 state.json {:08x}\n", crc32fast::hash(state))
}

/// Parses a state file, given its checksum file's text: checks the checksum, the format, the
/// version and every field's bounds. Errors are one line.
pub fn parse(bytes: &[u8], checksum: &str) -> Result<SnapshotState, String> {
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(format!("state.json is larger than {MAX_STATE_BYTES} bytes"));
    }
    if checksum.trim() != checksum_line(bytes).trim() {
        return Err("state.json does not match its checksum (truncated or corrupted)".into());
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("state.json is not JSON ({e}): truncated or corrupted"))?;
    match value.get("format").and_then(serde_json::Value::as_str) {
        Some(FORMAT) => {}
        _ => return Err("state.json is not a Mirrorball snapshot".into()),
    }
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if (u64::from(OLDEST_VERSION)..=u64::from(VERSION)).contains(&v) => {}
        Some(v) => {
            return Err(format!(
                "snapshot version {v}; this vmm reads versions {OLDEST_VERSION} to {VERSION}"
            ))
        }
        None => return Err("state.json has no version".into()),
    }
    let state: SnapshotState =
        serde_json::from_value(value).map_err(|e| format!("state.json: {e}"))?;
    check(&state)?;
    Ok(state)
}

fn check(state: &SnapshotState) -> Result<(), String> {
    let vm = &state.vm;
    match (
        vm.guest.as_str(),
        &state.linux,
        &state.machine,
        &state.devices,
    ) {
        ("workload", None, None, None) if state.disk.is_none() => {}
        ("linux", Some(linux), Some(m), Some(devices)) => {
            machine::validate(m)?;
            if linux.cmdline.len() > 64 << 10 {
                return Err("state.json: the command line is too long".into());
            }
            match (&state.disk, &devices.blk) {
                (Some(d), Some(_)) => disk::validate(d)?,
                (None, None) => {}
                _ => {
                    return Err("state.json: the disk and the virtio-blk device go together".into())
                }
            }
        }
        ("linux", ..) => {
            return Err(
                "state.json: a Linux guest's boot, machine or device state is missing".into(),
            )
        }
        ("workload", ..) => return Err("state.json: Linux state in a workload snapshot".into()),
        (other, ..) => return Err(format!("state.json: unknown guest kind {other:?}")),
    }
    if vm.vcpus == 0 || vm.vcpus > MAX_VCPUS || state.vcpus.len() != vm.vcpus {
        return Err(format!(
            "state.json describes {} vCPU states for {} vCPUs",
            state.vcpus.len(),
            vm.vcpus
        ));
    }
    if state.memory.bytes != vm.mem_bytes || !vm.mem_bytes.is_multiple_of(4096) || vm.mem_bytes == 0
    {
        return Err("state.json: memory size does not match the VM's".into());
    }
    for f in std::iter::once(&state.memory).chain(&state.guest_region) {
        if f.file.is_empty() || f.file.contains('/') || f.file.starts_with('.') {
            return Err(format!("state.json: bad file name {:?}", f.file));
        }
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        vcpu::validate(v, i)?;
    }
    if let Some(p) = &state.workload {
        if p.len() != vm.specs.len() {
            return Err("state.json: task progress does not match the tasks".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_checksums_formats_and_versions() {
        let text = br#"{"format":"mirrorball-snapshot","version":99}"#;
        let e = parse(text, &checksum_line(text)).expect_err("version");
        assert!(e.contains("version 99"), "{e}");
        let e = parse(text, "crc32 state.json 00000000").expect_err("crc");
        assert!(e.contains("checksum"), "{e}");
        let text = br#"{"format":"mirrorball-snapshot","version":1}"#;
        let e = parse(text, &checksum_line(text)).expect_err("old version");
        assert_eq!(e, "snapshot version 1; this vmm reads versions 2 to 3");
        let text = br#"{"format":"mirrorball-snapshot","version":4}"#;
        let e = parse(text, &checksum_line(text)).expect_err("newer version");
        assert_eq!(e, "snapshot version 4; this vmm reads versions 2 to 3");
        let text = br#"{"format":"x","version":2}"#;
        assert!(parse(text, &checksum_line(text)).is_err());
        let text = b"{\"format\":\"mirrorball-snap";
        let e = parse(text, &checksum_line(text)).expect_err("truncated");
        assert!(e.contains("truncated"), "{e}");
    }
}
