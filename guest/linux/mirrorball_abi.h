/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * mirrorball_abi.h - shared-memory ABI of Mirrorball's two-level fault profiler.
 *
 * The C twin of the Rust crate `mirrorball-profiler-abi` (profiler/abi); the specification is
 * profiler/ABI.md. The Rust tests parse this file and compile it, and fail if a constant,
 * a structure size or a field offset differs from the Rust definition.
 *
 * Two regions:
 *   guest region  - virtio shared-memory region mapped into guest physical memory; written by
 *                   the guest (this module): header, per-vCPU current-task slots, task table,
 *                   guest sample ring. The host maps it read-only and treats it as hostile.
 *   host region   - written by the VMM only and never mapped into the guest: header, host
 *                   sample ring (KVM pf_taken/pf_fixed/exits, host faults and CPU time per
 *                   vCPU, attributed to the guest task the vCPU ran).
 *
 * All fields are little-endian, naturally aligned, and every structure is explicitly padded
 * (reserved fields), so the layout is the same for any C compiler and for Rust.
 *
 * Writer rules for the guest (Linux kernel):
 *   - Ring record s (slot s % capacity):
 *         WRITE_ONCE(rec->seq, MB_SEQ_WRITING | s);
 *         smp_wmb();
 *         ... WRITE_ONCE() every field ...
 *         smp_store_release(&rec->seq, s);
 *         smp_store_release(&ctl->head, s + 1);
 *     One writer per ring (e.g. the sampling work item); start at the current head.
 *   - Seqlocked entries (struct mb_vcpu_slot, struct mb_task_entry):
 *         WRITE_ONCE(e->seq, e->seq + 1);   (now odd)
 *         smp_wmb();
 *         ... WRITE_ONCE() the fields, memcpy() comm ...
 *         smp_store_release(&e->seq, e->seq + 1);   (even again)
 *     One writer per entry: the vCPU's own sched_switch probe for its slot; the registration
 *     path, under its mutex, for the task table.
 *   - The header is written once, by whoever formats the region (the VMM); the guest may then
 *     update common.sample_period_ns and guest_boot_id only.
 */
#ifndef MIRRORBALL_ABI_H
#define MIRRORBALL_ABI_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/stddef.h>
typedef __u8 mb_u8;
typedef __u16 mb_u16;
typedef __u32 mb_u32;
typedef __u64 mb_u64;
#else
#include <stddef.h>
#include <stdint.h>
typedef uint8_t mb_u8;
typedef uint16_t mb_u16;
typedef uint32_t mb_u32;
typedef uint64_t mb_u64;
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the Mirrorball profiler ABI is little-endian"
#endif

/* ---- Versions and magics --------------------------------------------------------------- */

/* Readers reject another major version and accept any minor version of their major. */
#define MB_ABI_VERSION_MAJOR 1
#define MB_ABI_VERSION_MINOR 3
/* "MBGR" and "MBHR" as little-endian u32. */
#define MB_GUEST_MAGIC 0x5247424dU
#define MB_HOST_MAGIC 0x5248424dU

/* ---- Sizes and limits ------------------------------------------------------------------ */

#define MB_PAGE_SIZE 4096           /* region_size is a multiple of this */
#define MB_CACHE_LINE 64            /* parts start on this boundary (readers require 8) */
#define MB_HEADER_SIZE 256          /* sizeof a region header in this minor version */
#define MB_MAX_VCPUS 4096
#define MB_MAX_TASKS 65536
#define MB_MAX_RING_RECORDS 16777216
#define MB_MAX_STRIDE 4096          /* largest entry stride a reader accepts */
#define MB_COMM_LEN 16              /* TASK_COMM_LEN */

/* ---- Special values -------------------------------------------------------------------- */

#define MB_TASK_NONE 0xffffffffU    /* task_id: not a registered task */
#define MB_CPU_NONE 0xffffffffU     /* cpu: unknown */
#define MB_SEQ_FIRST 1              /* first ring sequence number; seq 0 = never written */
#define MB_SEQ_WRITING 0x8000000000000000ULL /* in a record's seq while it is rewritten */

/* common.clock_id */
#define MB_CLOCK_NONE 0             /* timestamps carry no meaning */
#define MB_CLOCK_MONOTONIC 1        /* the writer's CLOCK_MONOTONIC, ns (ktime_get_ns()) */

/* mb_task_entry.state */
#define MB_TASK_FREE 0
#define MB_TASK_REGISTERED 1
#define MB_TASK_UNREGISTERED 2      /* kept (pid, comm) until reused */

/* mb_vcpu_slot.flags */
#define MB_VCPU_IDLE 0x1            /* the idle task */
#define MB_VCPU_KTHREAD 0x2         /* a kernel thread */

/* mb_guest_sample.flags */
#define MB_SAMPLE_EXITED 0x1        /* the task exited; final counters */

/* mb_host_sample.attr_flags */
#define MB_ATTR_SLOT_VALID 0x1      /* vCPU slot read consistently */
#define MB_ATTR_SWITCHED 0x2        /* the guest switched tasks during the interval */
#define MB_ATTR_SLOT_BUSY 0x4       /* slot stayed mid-update: not attributed */
#define MB_ATTR_EXACT 0x8           /* minor 1: only the attributed task ran in the intervals */
#define MB_ATTR_AT_SWITCH 0x10      /* minor 1: intervals closed at announced task switches */
#define MB_ATTR_MERGED 0x20         /* minor 1: excess tasks of one tick, attributed to none */
#define MB_ATTR_MEMORY 0x40         /* minor 3: a memory record: only cow_breaks is set */
#define MB_MEM_CLONED 0x1          /* minor 2, struct mb_mem_sharing.flags: RAM cloned from a template */
#define MB_VM_PAUSED 0x1           /* minor 3, struct mb_host_header.vm_state: vCPUs paused */

/* ---- Headers --------------------------------------------------------------------------- */

/* First 64 bytes of both headers. */
struct mb_common_header {
	mb_u32 magic;             /* MB_GUEST_MAGIC / MB_HOST_MAGIC, stored last (release) */
	mb_u16 version_major;
	mb_u16 version_minor;
	mb_u32 header_size;       /* bytes of the whole header, >= MB_HEADER_SIZE */
	mb_u32 flags;             /* reserved, 0 */
	mb_u64 region_size;       /* bytes, multiple of MB_PAGE_SIZE */
	mb_u64 generation;        /* set by the formatter; changes when the region is reformatted */
	mb_u64 sample_period_ns;  /* period of the sampler filling this region's ring (live) */
	mb_u32 vcpu_count;
	mb_u32 clock_id;          /* MB_CLOCK_* of the ring's timestamps */
	mb_u64 reserved[2];
};

/* An array of fixed-size entries: entry i at offset + i * stride. */
struct mb_table_desc {
	mb_u64 offset;            /* from the start of the region */
	mb_u32 capacity;
	mb_u32 stride;            /* >= sizeof the entry; larger in later minor versions */
};

/* A sample ring: control block (head) and records. */
struct mb_ring_desc {
	mb_u64 ctl_offset;        /* struct mb_ring_ctl */
	mb_u64 slots_offset;      /* record 0 */
	mb_u32 capacity;          /* records */
	mb_u32 stride;            /* >= sizeof the record */
};

struct mb_guest_header {
	struct mb_common_header common;
	struct mb_table_desc vcpus;   /* struct mb_vcpu_slot[vcpu_count] */
	struct mb_table_desc tasks;   /* struct mb_task_entry[] */
	struct mb_ring_desc ring;     /* struct mb_guest_sample[] */
	mb_u64 guest_boot_id;         /* written by the guest driver when it attaches */
	mb_u64 reserved[16];
};

/* A VM's memory against its template (host region, minor 2); seqlock, odd while written. */
struct mb_mem_sharing {
	mb_u64 seq;
	mb_u64 ram_pages;
	mb_u64 shared_pages;          /* still the template's */
	mb_u64 private_pages;         /* the VM's own: copied, fresh, or memory of its own */
	mb_u64 merged_pages;          /* private pages KSM merged */
	mb_u64 cow_breaks;            /* private pages gained since the start */
	mb_u64 flags;                 /* MB_MEM_CLONED */
	mb_u64 scanned_ns;            /* host CLOCK_MONOTONIC of the scan */
};

struct mb_host_header {
	struct mb_common_header common;
	struct mb_ring_desc ring;     /* struct mb_host_sample[] */
	struct mb_mem_sharing mem;    /* minor 2 */
	mb_u64 vm_state;              /* minor 3: MB_VM_PAUSED */
	mb_u64 reserved[12];
};

/* One cache line: head alone. */
struct mb_ring_ctl {
	mb_u64 head;              /* next sequence number to write; MB_SEQ_FIRST when empty */
	mb_u64 reserved[7];
};

/* ---- Guest region entries -------------------------------------------------------------- */

/* What one vCPU runs now; rewritten by the guest at every context switch (seqlocked). */
struct mb_vcpu_slot {
	mb_u64 seq;               /* odd while being written */
	mb_u64 switch_count;
	mb_u64 switch_time_ns;    /* guest clock at the last switch */
	mb_u32 task_id;           /* task-table index, or MB_TASK_NONE */
	mb_u32 pid;               /* task->pid */
	mb_u32 tgid;              /* task->tgid */
	mb_u32 flags;             /* MB_VCPU_* */
	char comm[MB_COMM_LEN];   /* task->comm, NUL-padded */
	mb_u64 reserved;
};

/* One registered task (seqlocked). task_id = index in the table. */
struct mb_task_entry {
	mb_u64 seq;               /* odd while being written */
	mb_u64 registered_ns;
	mb_u64 unregistered_ns;   /* 0 while registered */
	mb_u32 pid;
	mb_u32 tgid;
	mb_u32 state;             /* MB_TASK_* */
	mb_u32 flags;             /* reserved, 0 */
	char comm[MB_COMM_LEN];
	mb_u64 reserved;
};

/* ---- Ring records ---------------------------------------------------------------------- */

/* Guest sample: one registered task's ABSOLUTE counters. */
struct mb_guest_sample {
	mb_u64 seq;               /* 0 = never written; MB_SEQ_WRITING | s while rewritten */
	mb_u64 timestamp_ns;      /* guest clock */
	mb_u32 task_id;
	mb_u32 pid;
	mb_u64 min_flt;           /* task->min_flt */
	mb_u64 maj_flt;           /* task->maj_flt */
	mb_u64 utime_ns;
	mb_u64 stime_ns;
	mb_u32 cpu;               /* vCPU the task last ran on, or MB_CPU_NONE */
	mb_u32 flags;             /* MB_SAMPLE_* */
};

/* Host sample: one vCPU over one interval (deltas), written by the VMM only. */
struct mb_host_sample {
	mb_u64 seq;
	mb_u64 timestamp_ns;      /* host CLOCK_MONOTONIC at the end of the interval */
	mb_u32 task_id;           /* attributed (guest-claimed), or MB_TASK_NONE */
	mb_u32 pid;               /* attributed (guest-claimed), 0 if unknown */
	mb_u32 vcpu;
	mb_u32 attr_flags;        /* MB_ATTR_* */
	mb_u64 interval_ns;
	mb_u64 pf_taken;          /* KVM binary stats, deltas */
	mb_u64 pf_fixed;
	mb_u64 exits;
	mb_u64 host_min_flt;      /* vCPU thread, deltas */
	mb_u64 host_maj_flt;
	mb_u64 vcpu_utime_ns;
	mb_u64 vcpu_stime_ns;
	mb_u64 guest_switch_count; /* the vCPU slot's switch_count as read (guest-claimed) */
	mb_u32 slot_flags;        /* minor 1: the slot's MB_VCPU_* flags of the attributed task */
	mb_u32 switches;          /* minor 1: announced switches that closed these intervals */
	mb_u64 cow_breaks;        /* minor 3: copy-on-write breaks (MB_ATTR_MEMORY records) */
	mb_u64 vcpu_wait_ns;      /* minor 3: vCPU thread's host run-queue wait (steal), delta */
};

/* ---- Layout checks (kept identical to the Rust definitions by the Rust tests) ---------- */

/* struct mb_common_header */
_Static_assert(sizeof(struct mb_common_header) == 64, "struct mb_common_header size");
_Static_assert(offsetof(struct mb_common_header, magic) == 0, "struct mb_common_header.magic");
_Static_assert(sizeof(((const struct mb_common_header *)0)->magic) == 4, "struct mb_common_header.magic size");
_Static_assert(offsetof(struct mb_common_header, version_major) == 4, "struct mb_common_header.version_major");
_Static_assert(sizeof(((const struct mb_common_header *)0)->version_major) == 2, "struct mb_common_header.version_major size");
_Static_assert(offsetof(struct mb_common_header, version_minor) == 6, "struct mb_common_header.version_minor");
_Static_assert(sizeof(((const struct mb_common_header *)0)->version_minor) == 2, "struct mb_common_header.version_minor size");
_Static_assert(offsetof(struct mb_common_header, header_size) == 8, "struct mb_common_header.header_size");
_Static_assert(sizeof(((const struct mb_common_header *)0)->header_size) == 4, "struct mb_common_header.header_size size");
_Static_assert(offsetof(struct mb_common_header, flags) == 12, "struct mb_common_header.flags");
_Static_assert(sizeof(((const struct mb_common_header *)0)->flags) == 4, "struct mb_common_header.flags size");
_Static_assert(offsetof(struct mb_common_header, region_size) == 16, "struct mb_common_header.region_size");
_Static_assert(sizeof(((const struct mb_common_header *)0)->region_size) == 8, "struct mb_common_header.region_size size");
_Static_assert(offsetof(struct mb_common_header, generation) == 24, "struct mb_common_header.generation");
_Static_assert(sizeof(((const struct mb_common_header *)0)->generation) == 8, "struct mb_common_header.generation size");
_Static_assert(offsetof(struct mb_common_header, sample_period_ns) == 32, "struct mb_common_header.sample_period_ns");
_Static_assert(sizeof(((const struct mb_common_header *)0)->sample_period_ns) == 8, "struct mb_common_header.sample_period_ns size");
_Static_assert(offsetof(struct mb_common_header, vcpu_count) == 40, "struct mb_common_header.vcpu_count");
_Static_assert(sizeof(((const struct mb_common_header *)0)->vcpu_count) == 4, "struct mb_common_header.vcpu_count size");
_Static_assert(offsetof(struct mb_common_header, clock_id) == 44, "struct mb_common_header.clock_id");
_Static_assert(sizeof(((const struct mb_common_header *)0)->clock_id) == 4, "struct mb_common_header.clock_id size");
_Static_assert(offsetof(struct mb_common_header, reserved) == 48, "struct mb_common_header.reserved");
_Static_assert(sizeof(((const struct mb_common_header *)0)->reserved) == 16, "struct mb_common_header.reserved size");

/* struct mb_table_desc */
_Static_assert(sizeof(struct mb_table_desc) == 16, "struct mb_table_desc size");
_Static_assert(offsetof(struct mb_table_desc, offset) == 0, "struct mb_table_desc.offset");
_Static_assert(sizeof(((const struct mb_table_desc *)0)->offset) == 8, "struct mb_table_desc.offset size");
_Static_assert(offsetof(struct mb_table_desc, capacity) == 8, "struct mb_table_desc.capacity");
_Static_assert(sizeof(((const struct mb_table_desc *)0)->capacity) == 4, "struct mb_table_desc.capacity size");
_Static_assert(offsetof(struct mb_table_desc, stride) == 12, "struct mb_table_desc.stride");
_Static_assert(sizeof(((const struct mb_table_desc *)0)->stride) == 4, "struct mb_table_desc.stride size");

/* struct mb_ring_desc */
_Static_assert(sizeof(struct mb_ring_desc) == 24, "struct mb_ring_desc size");
_Static_assert(offsetof(struct mb_ring_desc, ctl_offset) == 0, "struct mb_ring_desc.ctl_offset");
_Static_assert(sizeof(((const struct mb_ring_desc *)0)->ctl_offset) == 8, "struct mb_ring_desc.ctl_offset size");
_Static_assert(offsetof(struct mb_ring_desc, slots_offset) == 8, "struct mb_ring_desc.slots_offset");
_Static_assert(sizeof(((const struct mb_ring_desc *)0)->slots_offset) == 8, "struct mb_ring_desc.slots_offset size");
_Static_assert(offsetof(struct mb_ring_desc, capacity) == 16, "struct mb_ring_desc.capacity");
_Static_assert(sizeof(((const struct mb_ring_desc *)0)->capacity) == 4, "struct mb_ring_desc.capacity size");
_Static_assert(offsetof(struct mb_ring_desc, stride) == 20, "struct mb_ring_desc.stride");
_Static_assert(sizeof(((const struct mb_ring_desc *)0)->stride) == 4, "struct mb_ring_desc.stride size");

/* struct mb_guest_header */
_Static_assert(sizeof(struct mb_guest_header) == 256, "struct mb_guest_header size");
_Static_assert(offsetof(struct mb_guest_header, common) == 0, "struct mb_guest_header.common");
_Static_assert(sizeof(((const struct mb_guest_header *)0)->common) == 64, "struct mb_guest_header.common size");
_Static_assert(offsetof(struct mb_guest_header, vcpus) == 64, "struct mb_guest_header.vcpus");
_Static_assert(sizeof(((const struct mb_guest_header *)0)->vcpus) == 16, "struct mb_guest_header.vcpus size");
_Static_assert(offsetof(struct mb_guest_header, tasks) == 80, "struct mb_guest_header.tasks");
_Static_assert(sizeof(((const struct mb_guest_header *)0)->tasks) == 16, "struct mb_guest_header.tasks size");
_Static_assert(offsetof(struct mb_guest_header, ring) == 96, "struct mb_guest_header.ring");
_Static_assert(sizeof(((const struct mb_guest_header *)0)->ring) == 24, "struct mb_guest_header.ring size");
_Static_assert(offsetof(struct mb_guest_header, guest_boot_id) == 120, "struct mb_guest_header.guest_boot_id");
_Static_assert(sizeof(((const struct mb_guest_header *)0)->guest_boot_id) == 8, "struct mb_guest_header.guest_boot_id size");
_Static_assert(offsetof(struct mb_guest_header, reserved) == 128, "struct mb_guest_header.reserved");
_Static_assert(sizeof(((const struct mb_guest_header *)0)->reserved) == 128, "struct mb_guest_header.reserved size");

/* struct mb_mem_sharing */
_Static_assert(sizeof(struct mb_mem_sharing) == 64, "struct mb_mem_sharing size");
_Static_assert(offsetof(struct mb_mem_sharing, seq) == 0, "struct mb_mem_sharing.seq");
_Static_assert(sizeof(((const struct mb_mem_sharing *)0)->seq) == 8, "struct mb_mem_sharing.seq size");
_Static_assert(offsetof(struct mb_mem_sharing, ram_pages) == 8, "struct mb_mem_sharing.ram_pages");
_Static_assert(sizeof(((const struct mb_mem_sharing *)0)->ram_pages) == 8, "struct mb_mem_sharing.ram_pages size");
_Static_assert(offsetof(struct mb_mem_sharing, shared_pages) == 16, "struct mb_mem_sharing.shared_pages");
_Static_assert(sizeof(((const struct mb_mem_sharing *)0)->shared_pages) == 8, "struct mb_mem_sharing.shared_pages size");
_Static_assert(offsetof(struct mb_mem_sharing, private_pages) == 24, "struct mb_mem_sharing.private_pages");
_Static_assert(sizeof(((const struct mb_mem_sharing *)0)->private_pages) == 8, "struct mb_mem_sharing.private_pages size");
_Static_assert(offsetof(struct mb_mem_sharing, merged_pages) == 32, "struct mb_mem_sharing.merged_pages");
_Static_assert(sizeof(((const struct mb_mem_sharing *)0)->merged_pages) == 8, "struct mb_mem_sharing.merged_pages size");
_Static_assert(offsetof(struct mb_mem_sharing, cow_breaks) == 40, "struct mb_mem_sharing.cow_breaks");
_Static_assert(sizeof(((const struct mb_mem_sharing *)0)->cow_breaks) == 8, "struct mb_mem_sharing.cow_breaks size");
_Static_assert(offsetof(struct mb_mem_sharing, flags) == 48, "struct mb_mem_sharing.flags");
_Static_assert(sizeof(((const struct mb_mem_sharing *)0)->flags) == 8, "struct mb_mem_sharing.flags size");
_Static_assert(offsetof(struct mb_mem_sharing, scanned_ns) == 56, "struct mb_mem_sharing.scanned_ns");
_Static_assert(sizeof(((const struct mb_mem_sharing *)0)->scanned_ns) == 8, "struct mb_mem_sharing.scanned_ns size");

/* struct mb_host_header */
_Static_assert(sizeof(struct mb_host_header) == 256, "struct mb_host_header size");
_Static_assert(offsetof(struct mb_host_header, common) == 0, "struct mb_host_header.common");
_Static_assert(sizeof(((const struct mb_host_header *)0)->common) == 64, "struct mb_host_header.common size");
_Static_assert(offsetof(struct mb_host_header, ring) == 64, "struct mb_host_header.ring");
_Static_assert(sizeof(((const struct mb_host_header *)0)->ring) == 24, "struct mb_host_header.ring size");
_Static_assert(offsetof(struct mb_host_header, mem) == 88, "struct mb_host_header.mem");
_Static_assert(sizeof(((const struct mb_host_header *)0)->mem) == 64, "struct mb_host_header.mem size");
_Static_assert(offsetof(struct mb_host_header, vm_state) == 152, "struct mb_host_header.vm_state");
_Static_assert(sizeof(((const struct mb_host_header *)0)->vm_state) == 8, "struct mb_host_header.vm_state size");
_Static_assert(offsetof(struct mb_host_header, reserved) == 160, "struct mb_host_header.reserved");
_Static_assert(sizeof(((const struct mb_host_header *)0)->reserved) == 96, "struct mb_host_header.reserved size");

/* struct mb_ring_ctl */
_Static_assert(sizeof(struct mb_ring_ctl) == 64, "struct mb_ring_ctl size");
_Static_assert(offsetof(struct mb_ring_ctl, head) == 0, "struct mb_ring_ctl.head");
_Static_assert(sizeof(((const struct mb_ring_ctl *)0)->head) == 8, "struct mb_ring_ctl.head size");
_Static_assert(offsetof(struct mb_ring_ctl, reserved) == 8, "struct mb_ring_ctl.reserved");
_Static_assert(sizeof(((const struct mb_ring_ctl *)0)->reserved) == 56, "struct mb_ring_ctl.reserved size");

/* struct mb_vcpu_slot */
_Static_assert(sizeof(struct mb_vcpu_slot) == 64, "struct mb_vcpu_slot size");
_Static_assert(offsetof(struct mb_vcpu_slot, seq) == 0, "struct mb_vcpu_slot.seq");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->seq) == 8, "struct mb_vcpu_slot.seq size");
_Static_assert(offsetof(struct mb_vcpu_slot, switch_count) == 8, "struct mb_vcpu_slot.switch_count");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->switch_count) == 8, "struct mb_vcpu_slot.switch_count size");
_Static_assert(offsetof(struct mb_vcpu_slot, switch_time_ns) == 16, "struct mb_vcpu_slot.switch_time_ns");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->switch_time_ns) == 8, "struct mb_vcpu_slot.switch_time_ns size");
_Static_assert(offsetof(struct mb_vcpu_slot, task_id) == 24, "struct mb_vcpu_slot.task_id");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->task_id) == 4, "struct mb_vcpu_slot.task_id size");
_Static_assert(offsetof(struct mb_vcpu_slot, pid) == 28, "struct mb_vcpu_slot.pid");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->pid) == 4, "struct mb_vcpu_slot.pid size");
_Static_assert(offsetof(struct mb_vcpu_slot, tgid) == 32, "struct mb_vcpu_slot.tgid");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->tgid) == 4, "struct mb_vcpu_slot.tgid size");
_Static_assert(offsetof(struct mb_vcpu_slot, flags) == 36, "struct mb_vcpu_slot.flags");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->flags) == 4, "struct mb_vcpu_slot.flags size");
_Static_assert(offsetof(struct mb_vcpu_slot, comm) == 40, "struct mb_vcpu_slot.comm");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->comm) == 16, "struct mb_vcpu_slot.comm size");
_Static_assert(offsetof(struct mb_vcpu_slot, reserved) == 56, "struct mb_vcpu_slot.reserved");
_Static_assert(sizeof(((const struct mb_vcpu_slot *)0)->reserved) == 8, "struct mb_vcpu_slot.reserved size");

/* struct mb_task_entry */
_Static_assert(sizeof(struct mb_task_entry) == 64, "struct mb_task_entry size");
_Static_assert(offsetof(struct mb_task_entry, seq) == 0, "struct mb_task_entry.seq");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->seq) == 8, "struct mb_task_entry.seq size");
_Static_assert(offsetof(struct mb_task_entry, registered_ns) == 8, "struct mb_task_entry.registered_ns");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->registered_ns) == 8, "struct mb_task_entry.registered_ns size");
_Static_assert(offsetof(struct mb_task_entry, unregistered_ns) == 16, "struct mb_task_entry.unregistered_ns");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->unregistered_ns) == 8, "struct mb_task_entry.unregistered_ns size");
_Static_assert(offsetof(struct mb_task_entry, pid) == 24, "struct mb_task_entry.pid");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->pid) == 4, "struct mb_task_entry.pid size");
_Static_assert(offsetof(struct mb_task_entry, tgid) == 28, "struct mb_task_entry.tgid");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->tgid) == 4, "struct mb_task_entry.tgid size");
_Static_assert(offsetof(struct mb_task_entry, state) == 32, "struct mb_task_entry.state");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->state) == 4, "struct mb_task_entry.state size");
_Static_assert(offsetof(struct mb_task_entry, flags) == 36, "struct mb_task_entry.flags");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->flags) == 4, "struct mb_task_entry.flags size");
_Static_assert(offsetof(struct mb_task_entry, comm) == 40, "struct mb_task_entry.comm");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->comm) == 16, "struct mb_task_entry.comm size");
_Static_assert(offsetof(struct mb_task_entry, reserved) == 56, "struct mb_task_entry.reserved");
_Static_assert(sizeof(((const struct mb_task_entry *)0)->reserved) == 8, "struct mb_task_entry.reserved size");

/* struct mb_guest_sample */
_Static_assert(sizeof(struct mb_guest_sample) == 64, "struct mb_guest_sample size");
_Static_assert(offsetof(struct mb_guest_sample, seq) == 0, "struct mb_guest_sample.seq");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->seq) == 8, "struct mb_guest_sample.seq size");
_Static_assert(offsetof(struct mb_guest_sample, timestamp_ns) == 8, "struct mb_guest_sample.timestamp_ns");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->timestamp_ns) == 8, "struct mb_guest_sample.timestamp_ns size");
_Static_assert(offsetof(struct mb_guest_sample, task_id) == 16, "struct mb_guest_sample.task_id");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->task_id) == 4, "struct mb_guest_sample.task_id size");
_Static_assert(offsetof(struct mb_guest_sample, pid) == 20, "struct mb_guest_sample.pid");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->pid) == 4, "struct mb_guest_sample.pid size");
_Static_assert(offsetof(struct mb_guest_sample, min_flt) == 24, "struct mb_guest_sample.min_flt");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->min_flt) == 8, "struct mb_guest_sample.min_flt size");
_Static_assert(offsetof(struct mb_guest_sample, maj_flt) == 32, "struct mb_guest_sample.maj_flt");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->maj_flt) == 8, "struct mb_guest_sample.maj_flt size");
_Static_assert(offsetof(struct mb_guest_sample, utime_ns) == 40, "struct mb_guest_sample.utime_ns");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->utime_ns) == 8, "struct mb_guest_sample.utime_ns size");
_Static_assert(offsetof(struct mb_guest_sample, stime_ns) == 48, "struct mb_guest_sample.stime_ns");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->stime_ns) == 8, "struct mb_guest_sample.stime_ns size");
_Static_assert(offsetof(struct mb_guest_sample, cpu) == 56, "struct mb_guest_sample.cpu");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->cpu) == 4, "struct mb_guest_sample.cpu size");
_Static_assert(offsetof(struct mb_guest_sample, flags) == 60, "struct mb_guest_sample.flags");
_Static_assert(sizeof(((const struct mb_guest_sample *)0)->flags) == 4, "struct mb_guest_sample.flags size");

/* struct mb_host_sample */
_Static_assert(sizeof(struct mb_host_sample) == 128, "struct mb_host_sample size");
_Static_assert(offsetof(struct mb_host_sample, seq) == 0, "struct mb_host_sample.seq");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->seq) == 8, "struct mb_host_sample.seq size");
_Static_assert(offsetof(struct mb_host_sample, timestamp_ns) == 8, "struct mb_host_sample.timestamp_ns");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->timestamp_ns) == 8, "struct mb_host_sample.timestamp_ns size");
_Static_assert(offsetof(struct mb_host_sample, task_id) == 16, "struct mb_host_sample.task_id");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->task_id) == 4, "struct mb_host_sample.task_id size");
_Static_assert(offsetof(struct mb_host_sample, pid) == 20, "struct mb_host_sample.pid");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->pid) == 4, "struct mb_host_sample.pid size");
_Static_assert(offsetof(struct mb_host_sample, vcpu) == 24, "struct mb_host_sample.vcpu");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->vcpu) == 4, "struct mb_host_sample.vcpu size");
_Static_assert(offsetof(struct mb_host_sample, attr_flags) == 28, "struct mb_host_sample.attr_flags");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->attr_flags) == 4, "struct mb_host_sample.attr_flags size");
_Static_assert(offsetof(struct mb_host_sample, interval_ns) == 32, "struct mb_host_sample.interval_ns");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->interval_ns) == 8, "struct mb_host_sample.interval_ns size");
_Static_assert(offsetof(struct mb_host_sample, pf_taken) == 40, "struct mb_host_sample.pf_taken");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->pf_taken) == 8, "struct mb_host_sample.pf_taken size");
_Static_assert(offsetof(struct mb_host_sample, pf_fixed) == 48, "struct mb_host_sample.pf_fixed");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->pf_fixed) == 8, "struct mb_host_sample.pf_fixed size");
_Static_assert(offsetof(struct mb_host_sample, exits) == 56, "struct mb_host_sample.exits");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->exits) == 8, "struct mb_host_sample.exits size");
_Static_assert(offsetof(struct mb_host_sample, host_min_flt) == 64, "struct mb_host_sample.host_min_flt");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->host_min_flt) == 8, "struct mb_host_sample.host_min_flt size");
_Static_assert(offsetof(struct mb_host_sample, host_maj_flt) == 72, "struct mb_host_sample.host_maj_flt");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->host_maj_flt) == 8, "struct mb_host_sample.host_maj_flt size");
_Static_assert(offsetof(struct mb_host_sample, vcpu_utime_ns) == 80, "struct mb_host_sample.vcpu_utime_ns");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->vcpu_utime_ns) == 8, "struct mb_host_sample.vcpu_utime_ns size");
_Static_assert(offsetof(struct mb_host_sample, vcpu_stime_ns) == 88, "struct mb_host_sample.vcpu_stime_ns");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->vcpu_stime_ns) == 8, "struct mb_host_sample.vcpu_stime_ns size");
_Static_assert(offsetof(struct mb_host_sample, guest_switch_count) == 96, "struct mb_host_sample.guest_switch_count");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->guest_switch_count) == 8, "struct mb_host_sample.guest_switch_count size");
_Static_assert(offsetof(struct mb_host_sample, slot_flags) == 104, "struct mb_host_sample.slot_flags");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->slot_flags) == 4, "struct mb_host_sample.slot_flags size");
_Static_assert(offsetof(struct mb_host_sample, switches) == 108, "struct mb_host_sample.switches");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->switches) == 4, "struct mb_host_sample.switches size");
_Static_assert(offsetof(struct mb_host_sample, cow_breaks) == 112, "struct mb_host_sample.cow_breaks");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->cow_breaks) == 8, "struct mb_host_sample.cow_breaks size");
_Static_assert(offsetof(struct mb_host_sample, vcpu_wait_ns) == 120, "struct mb_host_sample.vcpu_wait_ns");
_Static_assert(sizeof(((const struct mb_host_sample *)0)->vcpu_wait_ns) == 8, "struct mb_host_sample.vcpu_wait_ns size");

#endif /* MIRRORBALL_ABI_H */
