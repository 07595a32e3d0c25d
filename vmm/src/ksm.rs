//! Kernel same-page merging (KSM) as `--ksm` uses it: the host's switch, and the figures a run
//! reports — the kernel's `pages_sharing`, this process's `ksm_merging_pages` and the
//! copy-on-write breaks of merged pages (`cow_ksm`). KSM merges only when the host's
//! `/sys/kernel/mm/ksm/run` is 1 (root sets it); the VMM never changes host settings itself.
use std::path::Path;

const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A field `name value` of a procfs key/value file.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
    })
}

/// One line for the user when `--ksm` cannot merge anything on this host, `None` when it can.
pub fn host_notice() -> Option<String> {
    match read_number(&Path::new(KSM_SYSFS).join("run")) {
        Some(1) => None,
        Some(_) => Some(
            "--ksm: the host's /sys/kernel/mm/ksm/run is not 1, so nothing is merged \
             (as root: echo 1 > /sys/kernel/mm/ksm/run)"
                .into(),
        ),
        None => Some("--ksm: this host kernel has no KSM (/sys/kernel/mm/ksm is missing)".into()),
    }
}

/// KSM figures at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KsmFigures {
    /// Host-wide pages that share a merged page (`pages_sharing`).
    pub pages_sharing: u64,
    /// This process's pages that are merged (`ksm_merging_pages`).
    pub merging_pages: u64,
    /// Host-wide copy-on-write breaks of merged pages (`cow_ksm` in /proc/vmstat).
    pub cow_ksm: u64,
}

impl KsmFigures {
    /// Reads the figures now (0 for any the host does not have).
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/ksm_stat").unwrap_or_default();
        let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
        Self {
            pages_sharing: read_number(&Path::new(KSM_SYSFS).join("pages_sharing")).unwrap_or(0),
            merging_pages: field(&status, "ksm_merging_pages").unwrap_or(0),
            cow_ksm: field(&vmstat, "cow_ksm").unwrap_or(0),
        }
    }

    /// One line: the figures now and what changed since `before`.
    pub fn summary_since(&self, before: &KsmFigures) -> String {
        format!(
            "KSM: this process's merged pages {} (at the end), host pages_sharing {}, \
             copy-on-write breaks of merged pages +{}",
            self.merging_pages,
            self.pages_sharing,
            self.cow_ksm.saturating_sub(before.cow_ksm)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_procfs_fields() {
        let text = "ksm_rmap_items 5\nksm_merging_pages 42\n";
        assert_eq!(field(text, "ksm_merging_pages"), Some(42));
        assert_eq!(field(text, "ksm_zero_pages"), None);
        let f = KsmFigures::read();
        let line = f.summary_since(&KsmFigures::default());
        assert!(line.starts_with("KSM: "), "{line}");
    }
}
