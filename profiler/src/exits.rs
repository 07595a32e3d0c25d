//! Exit-reason counting done by the VMM.
//!
//! Owns [`ExitKind`] (a compact classification of `KVM_RUN` outcomes, usable as an array index)
//! and [`ExitCounters`] (one counter per kind, serialised as a `{"io_out": 12, ...}` map). The VMM
//! counts exits itself because this host's KVM does not reflect all of them in its own stats
//! (`io_exits` stays 0 while userspace sees port-I/O exits).

use kvm_ioctls::VcpuExit;
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Why `KVM_RUN` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum ExitKind {
    /// Port I/O read (`in`).
    IoIn,
    /// Port I/O write (`out`).
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// `hlt` with no in-kernel irqchip.
    Hlt,
    /// Triple fault or similar.
    Shutdown,
    /// KVM internal error (e.g. emulation failure).
    InternalError,
    /// VM entry failed.
    FailEntry,
    /// `KVM_EXIT_SYSTEM_EVENT` (shutdown, reset, crash).
    SystemEvent,
    /// Interrupted by a signal (`KVM_EXIT_INTR` or `KVM_RUN` failing with `EINTR`).
    Intr,
    /// Anything else, including `KVM_RUN` errors other than `EINTR`/`EAGAIN`. Must stay the
    /// last variant: [`ExitKind::COUNT`] is derived from it.
    Other,
}

impl ExitKind {
    /// Number of kinds (the length of an array indexed by [`ExitKind::index`]).
    pub const COUNT: usize = ExitKind::Other as usize + 1;

    /// Every kind, in index order.
    pub const ALL: [ExitKind; ExitKind::COUNT] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::InternalError,
        ExitKind::FailEntry,
        ExitKind::SystemEvent,
        ExitKind::Intr,
        ExitKind::Other,
    ];

    /// Dense index in `0..COUNT`.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Stable snake_case name used in reports.
    pub const fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::InternalError => "internal_error",
            ExitKind::FailEntry => "fail_entry",
            ExitKind::SystemEvent => "system_event",
            ExitKind::Intr => "intr",
            ExitKind::Other => "other",
        }
    }

    /// Classifies a successful `KVM_RUN` result.
    pub fn from_exit(exit: &VcpuExit<'_>) -> Self {
        match exit {
            VcpuExit::IoIn(..) => ExitKind::IoIn,
            VcpuExit::IoOut(..) => ExitKind::IoOut,
            VcpuExit::MmioRead(..) => ExitKind::MmioRead,
            VcpuExit::MmioWrite(..) => ExitKind::MmioWrite,
            VcpuExit::Hlt => ExitKind::Hlt,
            VcpuExit::Shutdown => ExitKind::Shutdown,
            VcpuExit::InternalError => ExitKind::InternalError,
            VcpuExit::FailEntry(..) => ExitKind::FailEntry,
            VcpuExit::SystemEvent(..) => ExitKind::SystemEvent,
            VcpuExit::Intr => ExitKind::Intr,
            _ => ExitKind::Other,
        }
    }

    /// Classifies a failed `KVM_RUN`: `EINTR` and `EAGAIN` are [`ExitKind::Intr`], anything
    /// else is [`ExitKind::Other`].
    pub fn from_run_error(err: &kvm_ioctls::Error) -> Self {
        match err.errno() {
            libc::EINTR | libc::EAGAIN => ExitKind::Intr,
            _ => ExitKind::Other,
        }
    }
}

/// Per-kind exit counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitCounters {
    counts: [u64; ExitKind::COUNT],
}

impl ExitCounters {
    /// All counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one exit of `kind`.
    #[inline]
    pub fn record(&mut self, kind: ExitKind) {
        self.add(kind, 1);
    }

    /// Counts `n` exits of `kind`.
    #[inline]
    pub fn add(&mut self, kind: ExitKind, n: u64) {
        let c = &mut self.counts[kind.index()];
        *c = c.wrapping_add(n);
    }

    /// Exits of `kind` so far.
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind.index()]
    }

    /// All exits so far.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0, |a, &c| a.wrapping_add(c))
    }

    /// `(kind, count)` for every kind, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (ExitKind, u64)> + '_ {
        ExitKind::ALL.iter().map(|&k| (k, self.get(k)))
    }

    /// Adds another set of counters (e.g. to total all vCPUs of a VM).
    pub fn merge(&mut self, other: &ExitCounters) {
        for (k, n) in other.iter() {
            self.add(k, n);
        }
    }
}

/// Serialises as a map from [`ExitKind::name`] to count, with every kind present (a stable
/// schema for dashboards), in index order.
impl Serialize for ExitCounters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(ExitKind::COUNT))?;
        for (k, n) in self.iter() {
            map.serialize_entry(k.name(), &n)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_dense_and_names_are_unique() {
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        let mut names: Vec<_> = ExitKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ExitKind::COUNT);
    }

    #[test]
    fn record_counts_per_kind_and_total() {
        let mut c = ExitCounters::new();
        for _ in 0..12 {
            c.record(ExitKind::IoOut);
        }
        c.record(ExitKind::Hlt);
        c.add(ExitKind::MmioRead, 5);
        assert_eq!(c.get(ExitKind::IoOut), 12);
        assert_eq!(c.get(ExitKind::Hlt), 1);
        assert_eq!(c.get(ExitKind::MmioRead), 5);
        assert_eq!(c.get(ExitKind::IoIn), 0);
        assert_eq!(c.total(), 18);

        let mut sum = c.clone();
        sum.merge(&c);
        assert_eq!(sum.get(ExitKind::IoOut), 24);
        assert_eq!(sum.total(), 36);
    }

    #[test]
    fn serialises_as_a_map_of_every_kind() {
        let mut c = ExitCounters::new();
        for _ in 0..12 {
            c.record(ExitKind::IoOut);
        }
        c.record(ExitKind::Other);
        let v = serde_json::to_value(&c).unwrap();
        let map = v.as_object().expect("a JSON object");
        assert_eq!(map.len(), ExitKind::COUNT);
        assert_eq!(map["io_out"], 12);
        assert_eq!(map["other"], 1);
        assert_eq!(map["hlt"], 0);
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.starts_with(r#"{"io_in":0,"io_out":12,"#), "{text}");
    }

    #[test]
    fn classifies_exits_and_run_errors() {
        let data = [0u8; 1];
        assert_eq!(
            ExitKind::from_exit(&VcpuExit::IoOut(0x10, &data)),
            ExitKind::IoOut
        );
        assert_eq!(
            ExitKind::from_exit(&VcpuExit::MmioWrite(0x2000, &data)),
            ExitKind::MmioWrite
        );
        assert_eq!(ExitKind::from_exit(&VcpuExit::Hlt), ExitKind::Hlt);
        assert_eq!(ExitKind::from_exit(&VcpuExit::Unknown), ExitKind::Other);
        let eintr = kvm_ioctls::Error::new(libc::EINTR);
        assert_eq!(ExitKind::from_run_error(&eintr), ExitKind::Intr);
        let efault = kvm_ioctls::Error::new(libc::EFAULT);
        assert_eq!(ExitKind::from_run_error(&efault), ExitKind::Other);
    }
}
