//! The wire format: constants and `repr(C)` structures of both regions.
//!
//! Every structure is made of `core::sync::atomic` integers only, laid out without implicit
//! padding (explicit `reserved*` fields instead), little-endian. Atomics have the size and
//! alignment of the plain integers, so the C header declares the same structures with `__u64`,
//! `__u32`, `__u16` and `char` fields. Sizes and offsets are asserted at compile time here and
//! with `_Static_assert` in the header; the tests keep both in sync.

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64};

use crate::desc::{abi_consts, abi_struct, StructDesc};

abi_consts! {
    /// ABI major version: readers reject any other major version.
    pub const ABI_VERSION_MAJOR: u16 = 1 => "MB_ABI_VERSION_MAJOR";
    /// ABI minor version written by this crate; readers accept any minor version of their major.
    pub const ABI_VERSION_MINOR: u16 = 3 => "MB_ABI_VERSION_MINOR";
    /// Magic of the guest region: the bytes `"MBGR"` (little-endian `u32`).
    pub const GUEST_MAGIC: u32 = 0x5247_424d => "MB_GUEST_MAGIC";
    /// Magic of the host region: the bytes `"MBHR"` (little-endian `u32`).
    pub const HOST_MAGIC: u32 = 0x5248_424d => "MB_HOST_MAGIC";
    /// Region sizes are multiples of this.
    pub const PAGE_SIZE: u32 = 4096 => "MB_PAGE_SIZE";
    /// Parts of a region start on this boundary (the writer's choice; readers require 8).
    pub const CACHE_LINE: u32 = 64 => "MB_CACHE_LINE";
    /// Size of a region header, both kinds, in this minor version.
    pub const HEADER_SIZE: u32 = 256 => "MB_HEADER_SIZE";
    /// Most vCPUs a region describes.
    pub const MAX_VCPUS: u32 = 4096 => "MB_MAX_VCPUS";
    /// Most task-table entries.
    pub const MAX_TASKS: u32 = 65536 => "MB_MAX_TASKS";
    /// Most records in a sample ring.
    pub const MAX_RING_RECORDS: u32 = 16_777_216 => "MB_MAX_RING_RECORDS";
    /// Largest stride (bytes per entry) a reader accepts for any table or ring.
    pub const MAX_STRIDE: u32 = 4096 => "MB_MAX_STRIDE";
    /// Bytes of a task's command name (`TASK_COMM_LEN` in Linux), NUL-padded, maybe unterminated.
    pub const COMM_LEN: u32 = 16 => "MB_COMM_LEN";
    /// `task_id` meaning "no registered task".
    pub const TASK_NONE: u32 = 0xffff_ffff => "MB_TASK_NONE";
    /// `cpu` meaning "unknown".
    pub const CPU_NONE: u32 = 0xffff_ffff => "MB_CPU_NONE";
    /// First sequence number a ring writes; 0 in a record's `seq` means "never written".
    pub const SEQ_FIRST: u64 = 1 => "MB_SEQ_FIRST";
    /// Bit set in a ring record's `seq` while the writer rewrites it (`seq = SEQ_WRITING | s`).
    pub const SEQ_WRITING: u64 = 0x8000_0000_0000_0000 => "MB_SEQ_WRITING";
    /// `clock_id`: timestamps carry no meaning (the writer has no clock).
    pub const CLOCK_NONE: u32 = 0 => "MB_CLOCK_NONE";
    /// `clock_id`: timestamps are the writer's `CLOCK_MONOTONIC` in nanoseconds.
    pub const CLOCK_MONOTONIC: u32 = 1 => "MB_CLOCK_MONOTONIC";
    /// Task-table entry state: unused.
    pub const TASK_FREE: u32 = 0 => "MB_TASK_FREE";
    /// Task-table entry state: registered, sampled.
    pub const TASK_REGISTERED: u32 = 1 => "MB_TASK_REGISTERED";
    /// Task-table entry state: unregistered (kept so old samples still resolve; reusable).
    pub const TASK_UNREGISTERED: u32 = 2 => "MB_TASK_UNREGISTERED";
    /// vCPU slot flag: the vCPU runs the guest's idle task.
    pub const VCPU_IDLE: u32 = 0x1 => "MB_VCPU_IDLE";
    /// vCPU slot flag: the current task is a kernel thread.
    pub const VCPU_KTHREAD: u32 = 0x2 => "MB_VCPU_KTHREAD";
    /// Guest sample flag: the task has exited; these are its final counters.
    pub const SAMPLE_EXITED: u32 = 0x1 => "MB_SAMPLE_EXITED";
    /// Host attribution flag: the vCPU slot was read consistently (seqlock) for this record.
    pub const ATTR_SLOT_VALID: u32 = 0x1 => "MB_ATTR_SLOT_VALID";
    /// Host attribution flag: the guest switched tasks on this vCPU during the interval, so the
    /// deltas are attributed to the task running at the end of it (approximate).
    pub const ATTR_SWITCHED: u32 = 0x2 => "MB_ATTR_SWITCHED";
    /// Host attribution flag: the vCPU slot stayed mid-update (or its index was out of range);
    /// `task_id`/`pid` are `TASK_NONE`/0.
    pub const ATTR_SLOT_BUSY: u32 = 0x4 => "MB_ATTR_SLOT_BUSY";
    /// Host attribution flag (minor 1): exact. Every interval summed in the record ran the
    /// attributed task alone: it began at a task switch the guest announced (switch doorbell) or
    /// at a tick, and no switch the guest did not announce happened in it.
    pub const ATTR_EXACT: u32 = 0x8 => "MB_ATTR_EXACT";
    /// Host attribution flag (minor 1): the record sums intervals the VMM closed at announced
    /// task switches (`switches` of them); without it the record is one tick's interval.
    pub const ATTR_AT_SWITCH: u32 = 0x10 => "MB_ATTR_AT_SWITCH";
    /// Host attribution flag (minor 1): too many tasks ran on the vCPU within one tick; the
    /// intervals of the excess ones are summed here, attributed to no task.
    pub const ATTR_MERGED: u32 = 0x20 => "MB_ATTR_MERGED";
    /// [`MemSharing::flags`] (minor 2): the VM's RAM is a copy-on-write clone of a template.
    pub const MEM_CLONED: u64 = 0x1 => "MB_MEM_CLONED";
    /// Host attribution flag (minor 3): a memory record. It carries only `cow_breaks` (the
    /// copy-on-write breaks the VMM's sharing scan found in the attributed task's own memory
    /// since that task's previous memory record); its other deltas and `interval_ns` are 0.
    pub const ATTR_MEMORY: u32 = 0x40 => "MB_ATTR_MEMORY";
    /// [`HostHeader::vm_state`] (minor 3): the VM's vCPUs are paused (parked by its VMM).
    pub const VM_PAUSED: u64 = 0x1 => "MB_VM_PAUSED";
}

abi_struct! {
    /// First 64 bytes of both region headers.
    pub struct CommonHeader as "struct mb_common_header", size 64 {
        /// [`GUEST_MAGIC`] or [`HOST_MAGIC`]; stored last (release) when a region is formatted.
        pub magic: AtomicU32,
        /// [`ABI_VERSION_MAJOR`] of the writer.
        pub version_major: AtomicU16,
        /// [`ABI_VERSION_MINOR`] of the writer.
        pub version_minor: AtomicU16,
        /// Bytes of the whole header (this prefix included); ≥ [`HEADER_SIZE`], grows with
        /// minor versions.
        pub header_size: AtomicU32,
        /// Reserved, 0.
        pub flags: AtomicU32,
        /// Bytes of the region, a multiple of [`PAGE_SIZE`].
        pub region_size: AtomicU64,
        /// Generation chosen by whoever formatted the region (e.g. random per VMM start): a
        /// change means the region was reformatted and readers must start over.
        pub generation: AtomicU64,
        /// Period of the sampler that fills this region's ring, ns (0 = unknown). Live.
        pub sample_period_ns: AtomicU64,
        /// vCPUs of the VM.
        pub vcpu_count: AtomicU32,
        /// Clock of the ring's timestamps: [`CLOCK_NONE`] or [`CLOCK_MONOTONIC`].
        pub clock_id: AtomicU32,
        /// Reserved, 0.
        pub reserved: [AtomicU64; 2],
    }
}

abi_struct! {
    /// Where an array of fixed-size entries lives in a region.
    pub struct TableDesc as "struct mb_table_desc", size 16 {
        /// Byte offset of entry 0 from the start of the region.
        pub offset: AtomicU64,
        /// Entries.
        pub capacity: AtomicU32,
        /// Bytes from one entry to the next (≥ the entry's size).
        pub stride: AtomicU32,
    }
}

abi_struct! {
    /// Where a sample ring lives in a region.
    pub struct RingDesc as "struct mb_ring_desc", size 24 {
        /// Byte offset of the ring's [`RingCtl`].
        pub ctl_offset: AtomicU64,
        /// Byte offset of record 0.
        pub slots_offset: AtomicU64,
        /// Records.
        pub capacity: AtomicU32,
        /// Bytes from one record to the next (≥ the record's size).
        pub stride: AtomicU32,
    }
}

abi_struct! {
    /// Header of the guest region (guest-writable).
    pub struct GuestHeader as "struct mb_guest_header", size 256 {
        /// Common prefix; `magic` = [`GUEST_MAGIC`].
        pub common: CommonHeader,
        /// The per-vCPU current-task slots ([`VcpuSlot`]); `capacity` = `vcpu_count`.
        pub vcpus: TableDesc,
        /// The task table ([`TaskEntry`]).
        pub tasks: TableDesc,
        /// The guest sample ring ([`GuestSampleSlot`]).
        pub ring: RingDesc,
        /// Written by the guest driver when it attaches (e.g. the guest's boot id); 0 = none yet.
        pub guest_boot_id: AtomicU64,
        /// Reserved, 0.
        pub reserved: [AtomicU64; 16],
    }
}

abi_struct! {
    /// How a VM's RAM relates to its template (minor 2): rewritten by the VMM at every sharing
    /// scan under a seqlock (`seq` odd while it writes). All zero until the first scan.
    pub struct MemSharing as "struct mb_mem_sharing", size 64 {
        /// Seqlock: odd while the VMM rewrites the block.
        pub seq: AtomicU64,
        /// Guest RAM, pages.
        pub ram_pages: AtomicU64,
        /// Pages that map the template's page (read, never written).
        pub shared_pages: AtomicU64,
        /// Pages of the VM's own: copied by a write, fresh, or every page of a VM with memory of
        /// its own.
        pub private_pages: AtomicU64,
        /// Private pages KSM merged with identical pages elsewhere.
        pub merged_pages: AtomicU64,
        /// Copy-on-write breaks (private pages gained) since the VM started.
        pub cow_breaks: AtomicU64,
        /// [`MEM_CLONED`] when the RAM is a copy-on-write clone of a template.
        pub flags: AtomicU64,
        /// Host `CLOCK_MONOTONIC` of the scan, ns.
        pub scanned_ns: AtomicU64,
    }
}

abi_struct! {
    /// Header of the host region (written by the VMM only; never mapped into the guest).
    pub struct HostHeader as "struct mb_host_header", size 256 {
        /// Common prefix; `magic` = [`HOST_MAGIC`].
        pub common: CommonHeader,
        /// The host sample ring ([`HostSampleSlot`]).
        pub ring: RingDesc,
        /// The VM's memory sharing (minor 2; zero before).
        pub mem: MemSharing,
        /// The VM's run state flags (minor 3; zero before): [`VM_PAUSED`].
        pub vm_state: AtomicU64,
        /// Reserved, 0.
        pub reserved: [AtomicU64; 12],
    }
}

abi_struct! {
    /// Control block of a sample ring, one cache line.
    pub struct RingCtl as "struct mb_ring_ctl", size 64 {
        /// Next sequence number the writer will write ([`SEQ_FIRST`] when empty); records
        /// `head - capacity .. head` (clamped at 1) may be present. Release-stored by the writer.
        pub head: AtomicU64,
        /// Reserved, 0 (keeps `head` alone in its cache line).
        pub reserved: [AtomicU64; 7],
    }
}

abi_struct! {
    /// What one guest vCPU is running now; written by the guest on every context switch.
    pub struct VcpuSlot as "struct mb_vcpu_slot", size 64 {
        /// Seqlock: odd while the guest rewrites the slot.
        pub seq: AtomicU64,
        /// Context switches seen on this vCPU since the slot was last cleared.
        pub switch_count: AtomicU64,
        /// Guest clock at the last switch, ns ([`CommonHeader::clock_id`]).
        pub switch_time_ns: AtomicU64,
        /// Task-table index of the current task, or [`TASK_NONE`] if it is not registered.
        pub task_id: AtomicU32,
        /// Guest thread id (`task->pid` in Linux) of the current task.
        pub pid: AtomicU32,
        /// Guest process id (`task->tgid`).
        pub tgid: AtomicU32,
        /// [`VCPU_IDLE`], [`VCPU_KTHREAD`].
        pub flags: AtomicU32,
        /// Command name, [`COMM_LEN`] bytes in memory order (C: `char comm[16]`).
        pub comm: [AtomicU64; 2],
        /// Reserved, 0.
        pub reserved: AtomicU64,
    }
}

abi_struct! {
    /// One registered (or formerly registered) guest task.
    pub struct TaskEntry as "struct mb_task_entry", size 64 {
        /// Seqlock: odd while the guest rewrites the entry.
        pub seq: AtomicU64,
        /// Guest clock at registration, ns.
        pub registered_ns: AtomicU64,
        /// Guest clock at unregistration, ns (0 while registered).
        pub unregistered_ns: AtomicU64,
        /// Guest thread id.
        pub pid: AtomicU32,
        /// Guest process id.
        pub tgid: AtomicU32,
        /// [`TASK_FREE`], [`TASK_REGISTERED`] or [`TASK_UNREGISTERED`].
        pub state: AtomicU32,
        /// Reserved, 0.
        pub flags: AtomicU32,
        /// Command name at registration.
        pub comm: [AtomicU64; 2],
        /// Reserved, 0.
        pub reserved: AtomicU64,
    }
}

abi_struct! {
    /// One record of the guest sample ring: a registered task's ABSOLUTE counters.
    pub struct GuestSampleSlot as "struct mb_guest_sample", size 64 {
        /// Sequence number (0 = never written; [`SEQ_WRITING`] set while being rewritten).
        pub seq: AtomicU64,
        /// Guest clock, ns.
        pub timestamp_ns: AtomicU64,
        /// Task-table index of the task.
        pub task_id: AtomicU32,
        /// Guest thread id of the task.
        pub pid: AtomicU32,
        /// Minor faults since the task started (`min_flt`).
        pub min_flt: AtomicU64,
        /// Major faults since the task started (`maj_flt`).
        pub maj_flt: AtomicU64,
        /// User CPU time since the task started, ns.
        pub utime_ns: AtomicU64,
        /// System CPU time since the task started, ns.
        pub stime_ns: AtomicU64,
        /// Guest CPU (= vCPU index) the task last ran on, or [`CPU_NONE`].
        pub cpu: AtomicU32,
        /// [`SAMPLE_EXITED`].
        pub flags: AtomicU32,
    }
}

abi_struct! {
    /// One record of the host sample ring: one vCPU's host-side costs over one sampling interval,
    /// attributed to the guest task the guest said was running on it.
    pub struct HostSampleSlot as "struct mb_host_sample", size 128 {
        /// Sequence number (0 = never written; [`SEQ_WRITING`] set while being rewritten).
        pub seq: AtomicU64,
        /// Host `CLOCK_MONOTONIC` at the end of the interval, ns.
        pub timestamp_ns: AtomicU64,
        /// Attributed task: task-table index copied from the vCPU slot (guest-claimed), or
        /// [`TASK_NONE`].
        pub task_id: AtomicU32,
        /// Attributed guest thread id (guest-claimed), 0 if unknown.
        pub pid: AtomicU32,
        /// vCPU index.
        pub vcpu: AtomicU32,
        /// [`ATTR_SLOT_VALID`], [`ATTR_SWITCHED`], [`ATTR_SLOT_BUSY`], [`ATTR_EXACT`],
        /// [`ATTR_AT_SWITCH`], [`ATTR_MERGED`], [`ATTR_MEMORY`].
        pub attr_flags: AtomicU32,
        /// Length of the interval the deltas cover, ns.
        pub interval_ns: AtomicU64,
        /// Delta of KVM's `pf_taken` for this vCPU.
        pub pf_taken: AtomicU64,
        /// Delta of KVM's `pf_fixed`.
        pub pf_fixed: AtomicU64,
        /// Delta of KVM's `exits`.
        pub exits: AtomicU64,
        /// Delta of the vCPU thread's host minor faults.
        pub host_min_flt: AtomicU64,
        /// Delta of the vCPU thread's host major faults.
        pub host_maj_flt: AtomicU64,
        /// Delta of the vCPU thread's host user time, ns.
        pub vcpu_utime_ns: AtomicU64,
        /// Delta of the vCPU thread's host system time, ns.
        pub vcpu_stime_ns: AtomicU64,
        /// The vCPU slot's `switch_count` as read at the end of the interval (guest-claimed).
        pub guest_switch_count: AtomicU64,
        /// The vCPU slot's `flags` ([`VCPU_IDLE`], [`VCPU_KTHREAD`]) of the attributed task
        /// (minor 1; 0 before).
        pub slot_flags: AtomicU32,
        /// Announced task switches that closed intervals summed in this record (minor 1).
        pub switches: AtomicU32,
        /// Copy-on-write breaks charged to the task; non-zero only in [`ATTR_MEMORY`] records
        /// (minor 3).
        pub cow_breaks: AtomicU64,
        /// Delta of the time the vCPU thread waited on a host run queue (runnable, not
        /// running: steal as the guest sees it), ns (minor 3; 0 when unknown).
        pub vcpu_wait_ns: AtomicU64,
    }
}

/// Every shared structure, for tools and the C-header tests.
pub const STRUCTS: &[StructDesc] = &[
    CommonHeader::DESC,
    TableDesc::DESC,
    RingDesc::DESC,
    GuestHeader::DESC,
    MemSharing::DESC,
    HostHeader::DESC,
    RingCtl::DESC,
    VcpuSlot::DESC,
    TaskEntry::DESC,
    GuestSampleSlot::DESC,
    HostSampleSlot::DESC,
];

// The layout the documentation and the C header promise, spelled out.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(GUEST_MAGIC == u32::from_le_bytes(*b"MBGR"));
    assert!(HOST_MAGIC == u32::from_le_bytes(*b"MBHR"));
    assert!(size_of::<GuestHeader>() == HEADER_SIZE as usize);
    assert!(size_of::<HostHeader>() == HEADER_SIZE as usize);
    assert!(size_of::<RingCtl>() == CACHE_LINE as usize);
    assert!(size_of::<[AtomicU64; 2]>() == COMM_LEN as usize);

    assert!(offset_of!(CommonHeader, magic) == 0);
    assert!(offset_of!(CommonHeader, version_major) == 4);
    assert!(offset_of!(CommonHeader, version_minor) == 6);
    assert!(offset_of!(CommonHeader, header_size) == 8);
    assert!(offset_of!(CommonHeader, region_size) == 16);
    assert!(offset_of!(CommonHeader, generation) == 24);
    assert!(offset_of!(CommonHeader, sample_period_ns) == 32);
    assert!(offset_of!(CommonHeader, vcpu_count) == 40);
    assert!(offset_of!(CommonHeader, clock_id) == 44);

    assert!(offset_of!(GuestHeader, vcpus) == 64);
    assert!(offset_of!(GuestHeader, tasks) == 80);
    assert!(offset_of!(GuestHeader, ring) == 96);
    assert!(offset_of!(GuestHeader, guest_boot_id) == 120);
    assert!(offset_of!(HostHeader, ring) == 64);

    assert!(offset_of!(VcpuSlot, seq) == 0);
    assert!(offset_of!(VcpuSlot, switch_count) == 8);
    assert!(offset_of!(VcpuSlot, task_id) == 24);
    assert!(offset_of!(VcpuSlot, comm) == 40);
    assert!(offset_of!(TaskEntry, state) == 32);
    assert!(offset_of!(TaskEntry, comm) == 40);

    assert!(offset_of!(GuestSampleSlot, seq) == 0);
    assert!(offset_of!(GuestSampleSlot, timestamp_ns) == 8);
    assert!(offset_of!(GuestSampleSlot, task_id) == 16);
    assert!(offset_of!(GuestSampleSlot, min_flt) == 24);
    assert!(offset_of!(GuestSampleSlot, stime_ns) == 48);
    assert!(offset_of!(HostSampleSlot, seq) == 0);
    assert!(offset_of!(HostSampleSlot, timestamp_ns) == 8);
    assert!(offset_of!(HostSampleSlot, task_id) == 16);
    assert!(offset_of!(HostSampleSlot, vcpu) == 24);
    assert!(offset_of!(HostSampleSlot, pf_taken) == 40);
    assert!(offset_of!(HostSampleSlot, guest_switch_count) == 96);
    assert!(offset_of!(HostSampleSlot, slot_flags) == 104);
    assert!(offset_of!(HostSampleSlot, switches) == 108);
    assert!(offset_of!(HostSampleSlot, cow_breaks) == 112);
    assert!(offset_of!(HostSampleSlot, vcpu_wait_ns) == 120);
};
