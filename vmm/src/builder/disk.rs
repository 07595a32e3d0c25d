//! `--disk base.img[,overlay=PATH][,map=on|off]`: the copy-on-write disk a Linux VM gets (README
//! "Copy-on-write disk").
//!
//! This module owns [`DiskSpec`]: the parsed option, the base image opened once (read-only, one
//! `Arc` shared by every VM of the process) and where each VM's overlay goes: in memory by
//! default; with `overlay=PATH`, a new sparse file at PATH for a single VM, or at PATH.NAME for
//! each VM NAME of a fleet. Overlay files are created by the VM's builder (`O_EXCL`), but a path
//! that already exists is refused here, before any VM starts. With `map=on`, reads of whole base
//! pages are mapped into guest memory instead of copied (`mirrorball_devices::virtio_blk::map`),
//! each VM within its share of the process's mapping budget.
//!
//! A VM restored from a snapshot of a disk VM gets a [`DiskSpec::restored`]: the snapshot's
//! base, the snapshot's overlay as a shared read-only layer, and an overlay of its own in memory
//! (see `snapshot::disk`).
use std::path::PathBuf;
use std::sync::Arc;

use mirrorball_devices::virtio_blk::disk::{BaseImage, OverlaySpec};
use mirrorball_devices::virtio_blk::layer::SnapshotLayer;

/// One `--disk` option.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    /// The shared base image.
    pub base: Arc<BaseImage>,
    /// `overlay=PATH`, if given.
    pub overlay: Option<PathBuf>,
    /// Whether each VM's overlay file gets the VM's name appended (several VMs).
    pub per_vm: bool,
    /// `map=on`: reads of whole base pages are mapped, not copied.
    pub map: bool,
    /// VMs of the process that map base pages (each gets its share of the mapping budget).
    pub map_vms: usize,
    /// A snapshot's overlay between the base and each VM's own overlay (restored VMs).
    pub layer: Option<Arc<SnapshotLayer>>,
}

impl DiskSpec {
    /// Parses `base.img[,overlay=PATH]` and opens the base image; `per_vm` when several VMs
    /// share it. The error is one line for the user.
    pub fn parse(text: &str, per_vm: bool) -> Result<Self, String> {
        let mut parts = text.split(',');
        let base = parts
            .next()
            .filter(|b| !b.is_empty())
            .ok_or("--disk needs a base image: --disk base.img[,overlay=PATH]")?;
        let mut overlay = None;
        let mut map = None;
        for part in parts {
            match part.split_once('=') {
                Some(("overlay", path)) if !path.is_empty() && overlay.is_none() => {
                    overlay = Some(PathBuf::from(path));
                }
                Some(("map", value @ ("on" | "off"))) if map.is_none() => {
                    map = Some(value == "on");
                }
                _ => {
                    return Err(format!(
                        "--disk: unknown or repeated option {part:?} (expected overlay=PATH or \
                         map=on|off)"
                    ))
                }
            }
        }
        let base =
            BaseImage::open(std::path::Path::new(base)).map_err(|e| format!("--disk: {e}"))?;
        Ok(Self {
            base,
            overlay,
            per_vm,
            map: map.unwrap_or(false),
            map_vms: 1,
            layer: None,
        })
    }

    /// The disk of VMs restored from a snapshot: `base`, the snapshot's `layer` above it and
    /// each VM's overlay in memory.
    pub fn restored(base: Arc<BaseImage>, layer: Arc<SnapshotLayer>, map: bool) -> Self {
        Self {
            base,
            overlay: None,
            per_vm: false,
            map,
            map_vms: 1,
            layer: Some(layer),
        }
    }

    /// Mappings of base pages each VM may make (see
    /// [`mirrorball_devices::virtio_blk::map::map_budget`]).
    pub fn map_budget(&self) -> u64 {
        mirrorball_devices::virtio_blk::map::map_budget(self.map_vms)
    }

    /// Where the overlay of the VM named `vm` goes.
    pub fn overlay_for(&self, vm: &str) -> OverlaySpec {
        match &self.overlay {
            None => OverlaySpec::Memory,
            Some(path) if self.per_vm => {
                let mut name = path.clone().into_os_string();
                name.push(format!(".{vm}"));
                OverlaySpec::File(PathBuf::from(name))
            }
            Some(path) => OverlaySpec::File(path.clone()),
        }
    }

    /// Refuses overlay files that already exist (or are dangling symbolic links) for these VMs.
    pub fn check_overlays<'a>(&self, vms: impl Iterator<Item = &'a str>) -> Result<(), String> {
        for vm in vms {
            if let OverlaySpec::File(path) = self.overlay_for(vm) {
                if std::fs::symlink_metadata(&path).is_ok() {
                    return Err(format!(
                        "--disk: overlay {} already exists (overlays are always new files)",
                        path.display()
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let dir = std::env::temp_dir().join(format!("mb-diskspec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.img");
        std::fs::write(&base, [0u8; 1024]).unwrap();
        let b = base.display();
        let spec = DiskSpec::parse(&format!("{b},overlay=/x/ov"), true).unwrap();
        assert_eq!(
            spec.overlay_for("vm3"),
            OverlaySpec::File(PathBuf::from("/x/ov.vm3"))
        );
        let single = DiskSpec::parse(&format!("{b}"), false).unwrap();
        assert_eq!(single.overlay_for("vm0"), OverlaySpec::Memory);
        assert!(!single.map && !spec.map);
        let mapped = DiskSpec::parse(&format!("{b},map=on"), false).unwrap();
        assert!(mapped.map);
        assert!(mapped.map_budget() > 1000, "{}", mapped.map_budget());
        assert_eq!(single.base.len(), 1024);
        for bad in [
            String::new(),
            format!("{b},overlay="),
            format!("{b},cache=none"),
            format!("{b},overlay=a,overlay=b"),
            format!("{b},map=yes"),
            format!("{b},map=on,map=off"),
            dir.join("missing").display().to_string(),
        ] {
            assert!(DiskSpec::parse(&bad, false).is_err(), "{bad}");
        }
        let taken = DiskSpec::parse(&format!("{b},overlay={b}"), false).unwrap();
        assert!(taken.check_overlays(["vm0"].into_iter()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
