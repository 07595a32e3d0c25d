//! TEMPORARY stub (replaced by the real crate from helper/profiler at merge).
#![allow(missing_docs, dead_code)]
pub mod exits {
    #[derive(Clone, Copy, Debug)]
    pub enum ExitKind {
        IoIn,
        IoOut,
        MmioRead,
        MmioWrite,
        Hlt,
        Shutdown,
        FailEntry,
        InternalError,
        SystemEvent,
        Intr,
        Other,
    }
}
pub mod kvm_stats {
    pub struct StatsFd;
    impl StatsFd {
        pub fn for_vcpu(_: &kvm_ioctls::VcpuFd) -> Result<Self, ()> {
            Err(())
        }
    }
}
pub mod vcpu_accounting {
    #[derive(Debug, Default, serde::Serialize)]
    pub struct VcpuReport {
        pub index: usize,
        pub host_minor_faults: u64,
        pub host_major_faults: u64,
    }
    pub struct VcpuAccounting(usize);
    impl VcpuAccounting {
        pub fn new(i: usize, _: Option<super::kvm_stats::StatsFd>) -> Self {
            Self(i)
        }
        pub fn enter_run(&mut self) {}
        pub fn exit_run(&mut self, _: super::exits::ExitKind) {}
        pub fn finish(&mut self) -> VcpuReport {
            VcpuReport {
                index: self.0,
                ..Default::default()
            }
        }
    }
}
