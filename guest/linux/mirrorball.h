/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Linux guest driver of Mirrorball's page-fault profiler, private header:
 * the device contract, the driver's limits, its state and the functions its
 * files share.
 *
 * The profiler device (virtio-mmio, device ID 0x4d42, no virtqueues) exposes
 * the profiler's *guest region* as virtio shared memory region 0: a header,
 * one current-task slot per vCPU, a task table and a sample ring, formatted
 * by the VMM (profiler/ABI.md, mirrorball_abi.h). This driver fills it:
 *
 *   - /proc/mirrorball/status: "R <pid>" registers a task, "U <pid>"
 *     unregisters it, reading lists the registered tasks. A pid that names a
 *     thread-group leader registers the whole process (counters summed over
 *     its threads); any other thread id registers that thread alone.
 *   - /proc/mirrorball/period_ns: the sampling period (1 ms .. 60 s),
 *     forwarded to the device's requested_period_ns.
 *   - /dev/mirrorball: mmap() maps the region read-only.
 *   - The sampler writes one ring record of ABSOLUTE counters (min_flt,
 *     maj_flt, utime, stime, cpu) per registered task per period. It never
 *     changes the tasks' own counters.
 *   - A sched_switch probe keeps each vCPU's slot naming the task it runs.
 *
 * Writers, and what each one writes:
 *   - the sched_switch probe (and an IPI at attach): the slot of its own CPU;
 *   - everything else, under mb->lock and mb->region_lock: task-table
 *     entries, ring records, the ring head, header.sample_period_ns.
 *
 * Files (data flows from user space through the sampler into the region):
 *   - mb_main.c:    virtio driver: maps and validates the region, probe,
 *                   remove, module parameters;
 *   - mb_user.c:    /proc/mirrorball (status, period_ns), /dev/mirrorball;
 *   - mb_sampler.c: registrations, counters, the sampler, the period;
 *   - mb_region.c:  everything written into the region: validation, vCPU
 *                   slots and the sched_switch hook, task table, sample ring.
 */

#ifndef MIRRORBALL_H
#define MIRRORBALL_H

#include <linux/build_bug.h>
#include <linux/hrtimer.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/spinlock.h>
#include <linux/time64.h>
#include <linux/types.h>
#include <linux/uidgid.h>
#include <linux/workqueue.h>

#include "mirrorball_abi.h"

struct device;
struct file;
struct pid;
struct proc_dir_entry;
struct tracepoint;
struct virtio_device;

/* ---- Device contract ------------------------------------------------------ */

#define VIRTIO_ID_MIRRORBALL 0x4d42
/* Feature bit: the driver may write requested_period_ns. */
#define MB_F_PERIOD_CONTROL 0
/* The driver may announce task switches through switch_doorbell. */
#define MB_F_SWITCH_DOORBELL 1
#define MB_SHMID_GUEST_REGION 0

/* Device configuration space (little endian). */
struct mb_virtio_config {
	__le16 abi_version_major;
	__le16 abi_version_minor;
	__le32 vcpu_count;
	__le64 default_period_ns;
	__le64 requested_period_ns;	/* guest-writable */
	__le64 host_region_id;
	__le32 flags;
	__le32 reserved;
	__le64 min_period_ns;
	__le64 max_period_ns;
	/*
	 * Write-only: this CPU's index, written before the CPU's slot is
	 * rewritten for the next task, so the host closes the outgoing task's
	 * accounting interval exactly there (MB_F_SWITCH_DOORBELL).
	 */
	__le32 switch_doorbell;
	__le32 reserved2;
};

/* ---- Driver limits -------------------------------------------------------- */

#define MB_PERIOD_MIN_NS (1 * NSEC_PER_MSEC)		/* 1 kHz */
#define MB_PERIOD_MAX_NS (60 * NSEC_PER_SEC)
#define MB_PERIOD_DEFAULT_NS (50 * NSEC_PER_MSEC)	/* 20 Hz */
/* Largest region this driver maps (the default layout is 768 KiB). */
#define MB_REGION_MAX (1ULL << 30)
/* Most tasks registered at once (further bounded by the task table). */
#define MB_MAX_REGISTERED 1024U
/* Longest command accepted by /proc/mirrorball/status ("R 4194304\n"). */
#define MB_CMD_MAX 32

static_assert(TASK_COMM_LEN == MB_COMM_LEN);
static_assert(PAGE_SIZE % MB_PAGE_SIZE == 0);

static inline bool mb_period_ok(u64 ns)
{
	return ns >= MB_PERIOD_MIN_NS && ns <= MB_PERIOD_MAX_NS;
}

/* ---- State ----------------------------------------------------------------- */

/* A table or ring of the validated layout (copied once; never re-read). */
struct mb_array {
	u64 offset;
	u32 capacity;
	u32 stride;
};

struct mb_layout {
	u64 region_size;
	u32 header_size;
	u16 version_minor;
	struct mb_array vcpus;
	struct mb_array tasks;
	u64 ring_ctl;
	struct mb_array ring;
};

/* Absolute counters of a registered task. */
struct mb_counters {
	u64 min_flt;
	u64 maj_flt;
	u64 utime_ns;
	u64 stime_ns;
	u32 cpu;
};

/* A registered task (driver memory; mirrors its task-table entry). */
struct mb_reg {
	struct list_head node;
	struct pid *pid;		/* reference held */
	pid_t nr;			/* global pid / tgid number */
	u32 task_id;
	bool process;			/* whole thread group */
	bool exited;			/* final sample written */
	kuid_t owner;			/* euid of the registering writer */
	char comm[TASK_COMM_LEN];
	struct mb_counters last;
	u64 prev_utime, prev_stime;	/* process mode: monotonic split */
};

/* What the sched_switch probe looks up: an immutable, sorted RCU snapshot. */
struct mb_lookup_entry {
	pid_t nr;
	u32 task_id;
	struct pid *pid;		/* reference held by the snapshot */
	bool process;
};

struct mb_lookup {
	struct rcu_head rcu;
	unsigned int count;
	struct mb_lookup_entry entries[];
};

struct mb_dev {
	struct virtio_device *vdev;
	phys_addr_t phys;
	void *base;			/* memremap()ed guest region */
	struct mb_layout l;
	struct mb_guest_header *hdr;
	struct mb_ring_ctl *ctl;
	bool can_request_period;
	bool switch_doorbell;		/* MB_F_SWITCH_DOORBELL negotiated */

	/* Serializes ring pushes and task-table updates. */
	spinlock_t region_lock;
	u64 ring_next;			/* next ring sequence number */
	bool ring_broken;
	unsigned long *task_ids;	/* task ids held by registrations */

	/* Registrations, sampler state, period, config space. */
	struct mutex lock;
	struct list_head regs;
	unsigned int nr_regs;
	unsigned int max_regs;
	bool sampling;
	bool stopping;
	bool period_from_user;
	u64 period_ns;			/* read locklessly by the timer */
	struct mb_lookup __rcu *lookup;

	struct hrtimer timer;
	struct work_struct sample_work;
	struct work_struct config_work;

	struct tracepoint *tp_switch;
	bool tp_registered;

	struct proc_dir_entry *proc_dir;
	struct miscdevice misc;
	bool misc_registered;
};

/* The attached device, for /dev/mirrorball (one profiler device per VM). */
extern struct mutex mb_global_lock;
extern struct mb_dev *mb_attached;

/* ---- Region access --------------------------------------------------------- */

static inline void *mb_entry(const struct mb_dev *mb, const struct mb_array *a,
			     u32 i)
{
	/* i < capacity, so this stays inside the validated array. */
	return (u8 *)mb->base + a->offset + (u64)i * a->stride;
}

static inline struct mb_vcpu_slot *mb_slot(const struct mb_dev *mb, u32 cpu)
{
	return mb_entry(mb, &mb->l.vcpus, cpu);
}

static inline struct mb_task_entry *mb_task(const struct mb_dev *mb, u32 id)
{
	return mb_entry(mb, &mb->l.tasks, id);
}

/* ---- mb_region.c ------------------------------------------------------------ */

int mb_validate(struct device *dev, const void *base, u64 map_len,
		struct mb_layout *l);
void mb_slot_clear(struct mb_vcpu_slot *s);
int mb_hook_sched_switch(struct mb_dev *mb);
void mb_unhook_sched_switch(struct mb_dev *mb);
void mb_task_write(struct mb_task_entry *e, u64 registered_ns,
		   u64 unregistered_ns, u32 pid, u32 tgid, u32 state,
		   const char *comm);
int mb_task_id_alloc(struct mb_dev *mb, u32 *id);
void mb_ring_push(struct mb_dev *mb, u64 now_ns, u32 task_id, u32 pid,
		  const struct mb_counters *c, u32 flags);

/* ---- mb_sampler.c ----------------------------------------------------------- */

void mb_lookup_free_rcu(struct rcu_head *head);
void mb_sampler_stop(struct mb_dev *mb);
enum hrtimer_restart mb_timer_fn(struct hrtimer *timer);
int mb_register(struct mb_dev *mb, const struct file *file, int vnr);
int mb_unregister_vnr(struct mb_dev *mb, const struct file *file, int vnr);
void mb_sample_work_fn(struct work_struct *work);
int mb_request_period(struct mb_dev *mb, u64 ns);
void mb_config_work_fn(struct work_struct *work);

/* ---- mb_user.c -------------------------------------------------------------- */

int mb_proc_create(struct mb_dev *mb);
extern const struct file_operations mb_dev_fops;

#endif /* MIRRORBALL_H */
