//! The memory cgroup that enforces the machine-memory budget: found on cgroup v2 (`memory.high`
//! and `memory.max`) or v1 (`memory.limit_in_bytes`, OOM killer off), created as
//! `mirrorball-<pid>` at the root of the memory hierarchy, the whole `vmm` process moved in, and
//! on release the process moved back to the cgroup it came from and the directory removed.
use std::path::{Path, PathBuf};

use super::BudgetError;

/// Which cgroup interface holds the memory controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The unified hierarchy.
    V2,
    /// The legacy memory hierarchy.
    V1,
}

/// Where the memory controller is mounted, from `/proc/self/mountinfo` text.
pub fn find_memory_mount(mountinfo: &str) -> Option<(Version, PathBuf)> {
    let mut v1 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split_whitespace().nth(4)?;
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let options = r.nth(1).unwrap_or("");
        let path = PathBuf::from(mount_point.replace("\\040", " "));
        match fstype {
            "cgroup2" => {
                let controllers =
                    std::fs::read_to_string(path.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "memory") {
                    return Some((Version::V2, path));
                }
            }
            "cgroup" if options.split(',').any(|o| o == "memory") => v1 = Some(path),
            _ => {}
        }
    }
    v1.map(|p| (Version::V1, p))
}

/// This process's cgroup path (relative to the hierarchy root) for `version`, from
/// `/proc/self/cgroup` text.
pub fn own_cgroup(text: &str, version: Version) -> Option<String> {
    text.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let ours = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "memory"),
        };
        ours.then(|| path.to_string())
    })
}

/// The budget's cgroup, with the process inside.
#[derive(Debug)]
pub struct BudgetCgroup {
    /// v1 or v2.
    pub version: Version,
    /// The cgroup directory.
    pub dir: PathBuf,
    /// `cgroup.procs` of the cgroup the process came from.
    origin_procs: PathBuf,
    /// The limit in bytes.
    pub limit: u64,
    released: bool,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), BudgetError> {
    std::fs::write(dir.join(file), value).map_err(|e| BudgetError::Cgroup {
        what: format!("cannot write {value:?} to {}", dir.join(file).display()),
        source: e,
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The name of the budget cgroup of process `pid`.
pub fn cgroup_name(pid: u32) -> String {
    format!("mirrorball-{pid}")
}

impl BudgetCgroup {
    /// Creates the cgroup with a limit of `limit` bytes (v2: `memory.high`, and `memory.max`
    /// `slack` above it as the backstop); [`Self::join`] moves the process in.
    pub fn create(limit: u64, slack: u64) -> Result<Self, BudgetError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (version, root) =
            find_memory_mount(&mountinfo).ok_or(BudgetError::NoMemoryController)?;
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let origin = own_cgroup(&own, version).unwrap_or_else(|| "/".into());
        let origin_procs = root
            .join(origin.trim_start_matches('/'))
            .join("cgroup.procs");
        if version == Version::V2 {
            let enabled =
                std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == "memory") {
                write(&root, "cgroup.subtree_control", "+memory")?;
            }
        }
        let dir = root.join(cgroup_name(std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => BudgetError::NotPermitted(dir.clone()),
            _ => BudgetError::Cgroup {
                what: format!("cannot create {}", dir.display()),
                source: e,
            },
        })?;
        let cgroup = Self {
            version,
            dir,
            origin_procs,
            limit,
            released: false,
        };
        // From here on, dropping `cgroup` removes the directory again.
        match version {
            Version::V1 => {
                write(&cgroup.dir, "memory.limit_in_bytes", &limit.to_string())?;
                // A full budget with full swap stalls the VMM's threads instead of killing
                // them; the monitor sees `under_oom` and ends the VMs.
                write(&cgroup.dir, "memory.oom_control", "1")?;
            }
            Version::V2 => {
                write(&cgroup.dir, "memory.high", &limit.to_string())?;
                let max = limit.saturating_add(slack);
                write(&cgroup.dir, "memory.max", &max.to_string())?;
                if cgroup.dir.join("memory.swap.max").exists() {
                    write(&cgroup.dir, "memory.swap.max", "max")?;
                }
            }
        }
        Ok(cgroup)
    }

    /// Moves this process into the cgroup.
    pub fn join(&self) -> Result<(), BudgetError> {
        write(&self.dir, "cgroup.procs", &std::process::id().to_string())
    }

    /// Whether the limit was lifted ([`Self::lift`], by the watchdog).
    pub fn lifted(&self) -> bool {
        let file = match self.version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        };
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        match text.trim() {
            "max" => true,
            t => t
                .parse::<u64>()
                .is_ok_and(|v| v > self.limit.saturating_mul(2)),
        }
    }

    /// Bytes charged to the cgroup now.
    pub fn usage(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        read_u64(&self.dir.join(file)).unwrap_or(0)
    }

    /// The kernel's own peak, where it keeps one.
    pub fn kernel_peak(&self) -> Option<u64> {
        let file = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        read_u64(&self.dir.join(file))
    }

    /// Whether tasks of the cgroup wait for memory that cannot be reclaimed (v1 `under_oom`;
    /// v2 an OOM event).
    pub fn out_of_memory(&self) -> bool {
        let (file, key) = match self.version {
            Version::V1 => ("memory.oom_control", "under_oom"),
            Version::V2 => ("memory.events", "oom"),
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                l.split_once(' ')
                    .is_some_and(|(k, v)| k == key && v.trim() != "0")
            })
    }

    /// Sets the hard limit (v1 `memory.limit_in_bytes`, v2 `memory.high`) to `bytes`; false
    /// when the kernel refused (v1: EBUSY, the charge could not be reclaimed below it yet).
    pub fn set_limit(&self, bytes: u64) -> bool {
        let file = match self.version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.high",
        };
        std::fs::write(self.dir.join(file), bytes.to_string()).is_ok()
    }

    /// Lifts the limit so that stalled threads can run on to their end (the budget is broken
    /// then, and the VMs are ended).
    pub fn lift(&self) {
        let (file, value) = match self.version {
            Version::V1 => ("memory.limit_in_bytes", "-1"),
            Version::V2 => ("memory.max", "max"),
        };
        let _ = std::fs::write(self.dir.join(file), value);
        if self.version == Version::V2 {
            let _ = std::fs::write(self.dir.join("memory.high"), "max");
        }
    }

    /// Moves the process back where it came from and removes the cgroup; problems are one
    /// warning line each (this runs on the way out).
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        let pid = std::process::id().to_string();
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|l| l.trim() == pid) {
            if let Err(e) = std::fs::write(&self.origin_procs, &pid) {
                eprintln!(
                    "vmm: warning: cannot move back to {}: {e}",
                    self.origin_procs.display()
                );
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!(
                "vmm: warning: cannot remove the cgroup {}: {e}",
                self.dir.display()
            );
        }
    }
}

impl Drop for BudgetCgroup {
    fn drop(&mut self) {
        self.release();
    }
}

/// Removes `mirrorball-<pid>` cgroups left by processes that no longer exist (killed with
/// SIGKILL, say), under the memory hierarchy root.
pub fn remove_stale() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some((_, root)) = find_memory_mount(&mountinfo) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mirrorball-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_lines() {
        let text = "12:memory:/user.slice\n4:cpu,cpuacct:/x\n0::/user.slice/session-1.scope\n";
        assert_eq!(
            own_cgroup(text, Version::V1).as_deref(),
            Some("/user.slice")
        );
        assert_eq!(
            own_cgroup(text, Version::V2).as_deref(),
            Some("/user.slice/session-1.scope")
        );
        assert_eq!(own_cgroup("0::/\n", Version::V1), None);
    }

    #[test]
    fn v1_memory_mount_is_found() {
        let text = "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                    31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n";
        assert_eq!(
            find_memory_mount(text),
            Some((Version::V1, PathBuf::from("/sys/fs/cgroup/memory")))
        );
        assert_eq!(find_memory_mount("garbage\n"), None);
    }
}
