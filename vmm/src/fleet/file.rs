//! Fleet files: a TOML list of VMs, each with its own guest, memory, vCPUs, sampling rate and
//! share mode. Unknown fields are errors, so a typo is never silently ignored.
//!
//! ```toml
//! [defaults]            # optional: applies to every [[vm]] that does not say otherwise
//! share = "template"    # or "none"
//! sample_hz = 20
//!
//! [[vm]]
//! name = "reader"
//! workload = ["read 64 R 100000"]
//! vcpus = 1
//!
//! [[vm]]
//! name = "linux"
//! kernel = "bzImage"    # relative paths are relative to the fleet file
//! initrd = "rootfs.cpio"
//! memory = "256M"
//! disk = "base.img,overlay=ov"  # a copy-on-write disk; this VM's overlay is ov.linux
//!
//! [[vm]]
//! name = "clone1"
//! restore = "snap"      # a snapshot directory: the VM is a copy-on-write clone of it
//!
//! [[vm]]
//! name = "clone2"
//! restore = "snap"
//! lazy = true           # memory of its own, loaded from the snapshot on first touch
//! ```
//!
//! `disk` (per VM or in `[defaults]`, Linux VMs only) takes what `--disk` takes; every VM gets
//! an overlay of its own (in memory, or `PATH.NAME` with `overlay=PATH`), and VMs naming one base
//! image share it. A restored VM's disk is its snapshot's (base image, the snapshot's overlay
//! as a shared layer, an overlay of its own in memory), so `disk` does not go with `restore`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{FleetError, FleetPlan, ShareMode, VmPlan, MAX_VMS};
use crate::builder::disk::DiskSpec;
use crate::builder::{GuestConfig, LinuxConfig, WorkloadConfig};
use crate::cli::parse_size;
use crate::workload::TaskSpec;

/// Largest fleet file read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    share: Option<ShareMode>,
    sample_hz: Option<u32>,
    memory: Option<String>,
    vcpus: Option<usize>,
    disk: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmEntry {
    name: String,
    workload: Option<Vec<String>>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory: Option<String>,
    vcpus: Option<usize>,
    sample_hz: Option<u32>,
    share: Option<ShareMode>,
    disk: Option<String>,
    restore: Option<PathBuf>,
    lazy: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    vm: Vec<VmEntry>,
}

/// Reads and checks a fleet file: every VM's guest resolved (kernel paths relative to the file),
/// the fleet checked as a whole. `default_hz` is the command line's sampling rate.
pub fn load(path: &Path, default_hz: u32) -> Result<FleetPlan, FleetError> {
    let err = |why: String| FleetError::File {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(err(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base, default_hz).map_err(|e| match e {
        ParseError::Text(why) => err(why),
        ParseError::Snapshot(why) => FleetError::Snapshot {
            path: path.to_path_buf(),
            why,
        },
    })
}

fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => format!("{msg} (at byte {})", span.start),
        None => msg,
    }
}

/// Why fleet-file text is refused.
#[derive(Debug)]
pub enum ParseError {
    /// The text says something wrong.
    Text(String),
    /// A VM's `restore` names a snapshot that cannot be restored.
    Snapshot(String),
}

impl From<String> for ParseError {
    fn from(why: String) -> Self {
        Self::Text(why)
    }
}

impl From<&str> for ParseError {
    fn from(why: &str) -> Self {
        Self::Text(why.to_string())
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Text(why) | Self::Snapshot(why) => f.write_str(why),
        }
    }
}

/// Parses fleet-file text; paths are resolved against `base`.
pub fn parse(text: &str, base: &Path, default_hz: u32) -> Result<FleetPlan, ParseError> {
    let file: FleetFile = toml::from_str(text).map_err(|e| one_line(&e))?;
    if file.vm.is_empty() {
        return Err("no [[vm]] entries".into());
    }
    if file.vm.len() > MAX_VMS {
        return Err(format!("{} VMs; at most {MAX_VMS}", file.vm.len()).into());
    }
    let d = &file.defaults;
    let mut vms = Vec::with_capacity(file.vm.len());
    let mut bases = HashMap::new();
    for entry in file.vm {
        let name = entry.name.clone();
        let bad = |why: String| format!("VM {name:?}: {why}");
        let hz = entry.sample_hz.or(d.sample_hz).unwrap_or(default_hz);
        if hz > 10_000 {
            return Err(bad(format!("sample_hz {hz} is above 10000")).into());
        }
        let period = (hz > 0).then(|| Duration::from_nanos(1_000_000_000 / u64::from(hz)));
        let memory = match entry.memory.as_ref().or(d.memory.as_ref()) {
            Some(text) => Some(parse_size(text).map_err(|e| bad(format!("memory: {e}")))?),
            None => None,
        };
        let vcpus = entry.vcpus.or(d.vcpus);
        if let Some(dir) = &entry.restore {
            let own = [
                ("workload", entry.workload.is_some()),
                ("kernel", entry.kernel.is_some()),
                ("initrd", entry.initrd.is_some()),
                ("cmdline", entry.cmdline.is_some()),
                ("memory", entry.memory.is_some()),
                ("vcpus", entry.vcpus.is_some()),
                ("sample_hz", entry.sample_hz.is_some()),
                ("share", entry.share.is_some()),
                ("disk", entry.disk.is_some()),
            ];
            if let Some((key, _)) = own.iter().find(|(_, given)| *given) {
                return Err(bad(format!(
                    "{key} does not go with restore: the snapshot decides it"
                ))
                .into());
            }
            let dir = base.join(dir);
            let lazy = entry.lazy == Some(true);
            let config = crate::snapshot::restore::read_config(&dir)
                .map_err(|e| ParseError::Snapshot(bad(e.to_string())))?;
            vms.push(VmPlan {
                name,
                config,
                // Lazy clones share no template pages: memory of their own each
                // (`VmPlan::restore_memory`).
                share: if lazy {
                    ShareMode::None
                } else {
                    ShareMode::Template
                },
                restore: Some(dir),
            });
            continue;
        }
        if entry.lazy.is_some() {
            return Err(bad("lazy goes only with restore".into()).into());
        }
        let config = match (entry.workload, entry.kernel) {
            (Some(_), Some(_)) => {
                return Err(bad("give either workload or kernel, not both".into()).into())
            }
            (None, None) => return Err(bad("give a workload or a kernel".into()).into()),
            (Some(specs), None) => {
                if entry.initrd.is_some() || entry.cmdline.is_some() || entry.disk.is_some() {
                    return Err(bad("initrd, cmdline and disk go with a kernel".into()).into());
                }
                let specs = specs
                    .iter()
                    .map(|s| s.parse::<TaskSpec>().map_err(|e| bad(e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                if specs.is_empty() {
                    return Err(bad("workload has no tasks".into()).into());
                }
                GuestConfig::Workload(WorkloadConfig {
                    vcpus: vcpus.unwrap_or(specs.len()),
                    specs,
                    mem_bytes: memory,
                    profile_period: period,
                })
            }
            (None, Some(kernel)) => {
                let disk = match entry.disk.as_ref().or(d.disk.as_ref()) {
                    Some(text) => Some(vm_disk(text, base, &name, &mut bases).map_err(bad)?),
                    None => None,
                };
                GuestConfig::Linux(LinuxConfig {
                    kernel: base.join(kernel),
                    initrd: entry.initrd.map(|p| base.join(p)),
                    cmdline: entry.cmdline,
                    mem_bytes: memory.unwrap_or(crate::builder::linux::DEFAULT_MEM_BYTES),
                    vcpus: vcpus.unwrap_or(1),
                    profile_period: period,
                    disk,
                })
            }
        };
        let share = entry.share.or(d.share).unwrap_or(ShareMode::Template);
        vms.push(VmPlan {
            name,
            config,
            share,
            restore: None,
        });
    }
    // The VMs that map base pages share the process's mapping budget.
    let mapping = vms
        .iter()
        .filter(|vm| matches!(&vm.config, GuestConfig::Linux(l) if l.disk.as_ref().is_some_and(|d| d.map)))
        .count();
    for vm in &mut vms {
        if let GuestConfig::Linux(LinuxConfig {
            disk: Some(disk), ..
        }) = &mut vm.config
        {
            disk.map_vms = mapping.max(1);
        }
    }
    Ok(FleetPlan { vms })
}

/// A VM's `disk` entry: its paths resolved against `base`, its overlay `PATH.NAME` (checked to
/// be new), and one opened base image for all VMs that name the same file.
fn vm_disk(
    text: &str,
    base: &Path,
    name: &str,
    bases: &mut HashMap<PathBuf, DiskSpec>,
) -> Result<DiskSpec, String> {
    let resolved = text
        .split(',')
        .enumerate()
        .map(|(i, part)| match (i, part.split_once('=')) {
            (0, _) if !part.is_empty() => base.join(part).display().to_string(),
            (_, Some(("overlay", path))) if !path.is_empty() => {
                format!("overlay={}", base.join(path).display())
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let one_line = |e: String| format!("disk: {}", e.trim_start_matches("--disk: "));
    let mut spec = DiskSpec::parse(&resolved, true).map_err(one_line)?;
    let opened = bases
        .entry(spec.base.path().to_path_buf())
        .or_insert_with(|| spec.clone());
    spec.base = opened.base.clone();
    spec.check_overlays(std::iter::once(name))
        .map_err(one_line)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const TWO: &str = r#"
[defaults]
sample_hz = 50

[[vm]]
name = "a"
workload = ["read 8 R 100", "work 8 L 100"]
vcpus = 1

[[vm]]
name = "b"
workload = ["read 8 R 100", "work 8 L 100"]
share = "none"
sample_hz = 0
"#;

    #[test]
    fn parses_a_mixed_fleet() {
        let plan = parse(TWO, Path::new("/f"), 20).expect("fleet");
        assert_eq!(plan.vms.len(), 2);
        assert_eq!(plan.vms[0].name, "a");
        assert_eq!(plan.vms[0].share, ShareMode::Template);
        assert_eq!(plan.vms[1].share, ShareMode::None);
        let GuestConfig::Workload(a) = &plan.vms[0].config else {
            panic!("workload");
        };
        assert_eq!(a.vcpus, 1);
        assert_eq!(a.profile_period, Some(Duration::from_millis(20)));
        let GuestConfig::Workload(b) = &plan.vms[1].config else {
            panic!("workload");
        };
        assert_eq!((b.vcpus, b.profile_period), (2, None));
        plan.check().expect("valid");
    }

    #[test]
    fn a_restored_vm_takes_everything_from_its_snapshot() {
        let both = "[[vm]]\nname = \"c\"\nrestore = \"snap\"\nvcpus = 2\n";
        let e = parse(both, Path::new("/nowhere"), 20)
            .expect_err("vcpus")
            .to_string();
        assert!(e.contains("vcpus does not go with restore"), "{e}");
        let missing = "[[vm]]\nname = \"c\"\nrestore = \"snap\"\n";
        let e = parse(missing, Path::new("/nowhere"), 20).expect_err("no snapshot");
        assert!(matches!(e, ParseError::Snapshot(_)), "{e}");
        assert!(
            e.to_string()
                .starts_with("VM \"c\": snapshot /nowhere/snap:"),
            "{e}"
        );
    }

    #[test]
    fn linux_paths_are_relative_to_the_file() {
        let plan = parse(
            "[[vm]]\nname = \"l\"\nkernel = \"k/bzImage\"\ninitrd = \"/abs/i\"\n",
            Path::new("/etc/fleets"),
            20,
        )
        .expect("fleet");
        let GuestConfig::Linux(l) = &plan.vms[0].config else {
            panic!("linux");
        };
        assert_eq!(l.kernel, PathBuf::from("/etc/fleets/k/bzImage"));
        assert_eq!(l.initrd, Some(PathBuf::from("/abs/i")));
    }

    #[test]
    fn every_vm_gets_its_own_overlay_on_one_shared_base() {
        let dir = std::env::temp_dir().join(format!("mb-fleet-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("base.img"), [0u8; 4096]).unwrap();
        let text = "[defaults]\ndisk = \"base.img,overlay=ov\"\n\
                    [[vm]]\nname = \"a\"\nkernel = \"k\"\n\
                    [[vm]]\nname = \"b\"\nkernel = \"k\"\n\
                    [[vm]]\nname = \"c\"\nkernel = \"k\"\ndisk = \"base.img\"\n\
                    [[vm]]\nname = \"d\"\nkernel = \"k\"\n";
        let plan = parse(text, &dir, 20).expect("fleet");
        let disks: Vec<&DiskSpec> = plan
            .vms
            .iter()
            .map(|vm| match &vm.config {
                GuestConfig::Linux(l) => l.disk.as_ref().expect("disk"),
                GuestConfig::Workload(_) => panic!("linux"),
            })
            .collect();
        use mirrorball_devices::virtio_blk::disk::OverlaySpec;
        assert_eq!(
            disks[0].overlay_for("a"),
            OverlaySpec::File(dir.join("ov.a"))
        );
        assert_eq!(
            disks[1].overlay_for("b"),
            OverlaySpec::File(dir.join("ov.b"))
        );
        assert_eq!(disks[2].overlay_for("c"), OverlaySpec::Memory);
        assert!(
            disks.iter().all(|d| Arc::ptr_eq(&d.base, &disks[0].base)),
            "one base image for all"
        );
        // An overlay that exists, a missing base, a disk for a workload VM: one line each.
        std::fs::write(dir.join("ov.b"), b"x").unwrap();
        let cases = [
            (text.to_string(), "ov.b already exists"),
            (
                "[[vm]]\nname = \"a\"\nkernel = \"k\"\ndisk = \"missing.img\"\n".into(),
                "disk: cannot open base image",
            ),
            (
                "[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\ndisk = \"base.img\"\n".into(),
                "go with a kernel",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(&text, &dir, 20).expect_err(&text).to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_say_what_is_wrong_in_one_line() {
        let cases = [
            ("", "no [[vm]]"),
            ("[[vm]]\nname = \"a\"\n", "give a workload or a kernel"),
            (
                "[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\ncolour = 1\n",
                "unknown field",
            ),
            (
                "[[vm]]\nname = \"a\"\nworkload = [\"work 1 X 1\"]\n",
                "pattern",
            ),
            (
                "[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\nmemory = \"1Q\"\n",
                "unit",
            ),
            (
                "[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\nshare = \"all\"\n",
                "unknown variant",
            ),
            (
                "[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\nkernel = \"k\"\n",
                "not both",
            ),
            ("[[vm\n", "unclosed"),
        ];
        for (text, expected) in cases {
            let e = parse(text, Path::new("/"), 20).expect_err(text).to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn fleet_checks_catch_duplicates_and_template_mismatches() {
        let dup = "[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\n[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\n";
        let e = parse(dup, Path::new("/"), 20)
            .expect("parses")
            .check()
            .expect_err("dup");
        assert!(e.to_string().contains("two VMs are named \"a\""), "{e}");
        let sizes = "[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\n[[vm]]\nname = \"b\"\nworkload = [\"work 2 R 1\"]\n";
        let e = parse(sizes, Path::new("/"), 20)
            .expect("parses")
            .check()
            .expect_err("mismatch");
        assert!(e.to_string().contains("differs from a's"), "{e}");
        let ok = "[[vm]]\nname = \"a\"\nworkload = [\"work 1 R 1\"]\n[[vm]]\nname = \"b\"\nworkload = [\"work 2 R 1\"]\nshare = \"none\"\n";
        parse(ok, Path::new("/"), 20)
            .expect("parses")
            .check()
            .expect("a private VM may differ");
        let bad_name = "[[vm]]\nname = \"../x\"\nworkload = [\"work 1 R 1\"]\n";
        let e = parse(bad_name, Path::new("/"), 20)
            .expect("parses")
            .check()
            .expect_err("name");
        assert!(e.to_string().contains("not usable"), "{e}");
    }
}
