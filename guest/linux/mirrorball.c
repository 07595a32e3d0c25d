// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Linux guest driver of Mirrorball's page-fault profiler.
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
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/build_bug.h>
#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/ctype.h>
#include <linux/hrtimer.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/math64.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/pid.h>
#include <linux/proc_fs.h>
#include <linux/random.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/sched/cputime.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/seq_file.h>
#include <linux/seqlock.h>
#include <linux/slab.h>
#include <linux/smp.h>
#include <linux/sort.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/tracepoint.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/workqueue.h>

#include "mirrorball_abi.h"

/* ---- Device contract ------------------------------------------------------ */

#define VIRTIO_ID_MIRRORBALL 0x4d42
/* Feature bit: the driver may write requested_period_ns. */
#define MB_F_PERIOD_CONTROL 0
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

static unsigned long period_ns;
module_param(period_ns, ulong, 0444);
MODULE_PARM_DESC(period_ns,
		 "Initial sampling period in ns (1 ms .. 60 s; 0 = the device's default)");

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
static DEFINE_MUTEX(mb_global_lock);
static struct mb_dev *mb_attached;

/* ---- Region access --------------------------------------------------------- */

static void *mb_entry(const struct mb_dev *mb, const struct mb_array *a, u32 i)
{
	/* i < capacity, so this stays inside the validated array. */
	return (u8 *)mb->base + a->offset + (u64)i * a->stride;
}

static struct mb_vcpu_slot *mb_slot(const struct mb_dev *mb, u32 cpu)
{
	return mb_entry(mb, &mb->l.vcpus, cpu);
}

static struct mb_task_entry *mb_task(const struct mb_dev *mb, u32 id)
{
	return mb_entry(mb, &mb->l.tasks, id);
}

/* comm is read by the host as two 8-byte words: store it the same way. */
static void mb_store_comm(char *dst, const char *src)
{
	u64 w[2];

	memcpy(w, src, sizeof(w));
	WRITE_ONCE(*(u64 *)dst, w[0]);
	WRITE_ONCE(*(u64 *)(dst + 8), w[1]);
}

/* ---- Validation (profiler/ABI.md section 6) ------------------------------- */

static int mb_check_array(struct device *dev, const char *what, u64 offset,
			  u32 capacity, u32 stride, size_t min_stride,
			  u32 max_capacity, const struct mb_layout *l,
			  struct mb_array *out)
{
	u64 end;

	if (capacity == 0 || capacity > max_capacity) {
		dev_err(dev, "%s: bad capacity %u\n", what, capacity);
		return -EINVAL;
	}
	if (stride < min_stride || stride % 8 || stride > MB_MAX_STRIDE) {
		dev_err(dev, "%s: bad stride %u\n", what, stride);
		return -EINVAL;
	}
	if (offset % 8 || offset < l->header_size) {
		dev_err(dev, "%s: bad offset %llu\n", what, offset);
		return -EINVAL;
	}
	if (check_mul_overflow((u64)capacity, (u64)stride, &end) ||
	    check_add_overflow(end, offset, &end) || end > l->region_size) {
		dev_err(dev, "%s: outside the region\n", what);
		return -EINVAL;
	}
	out->offset = offset;
	out->capacity = capacity;
	out->stride = stride;
	return 0;
}

static u64 mb_array_end(const struct mb_array *a)
{
	return a->offset + (u64)a->capacity * a->stride;
}

/*
 * Validates the header of the region mapped at @base (@map_len bytes) and
 * copies its layout into @l. Every field is loaded once and checked as an
 * untrusted integer before it is used.
 */
static int mb_validate(struct device *dev, const void *base, u64 map_len,
		       struct mb_layout *l)
{
	const struct mb_guest_header *h = base;
	u64 starts[5], ends[5];
	struct mb_array ctl;
	u32 magic, vcpu_count;
	unsigned int i, j;
	u16 major;
	int err;

	if (map_len < sizeof(*h))
		return -EINVAL;
	/* Pairs with the formatter's release store of the magic. */
	magic = smp_load_acquire(&h->common.magic);
	if (magic != MB_GUEST_MAGIC) {
		dev_err(dev, "bad magic %#x\n", magic);
		return -EINVAL;
	}
	major = READ_ONCE(h->common.version_major);
	l->version_minor = READ_ONCE(h->common.version_minor);
	if (major != MB_ABI_VERSION_MAJOR) {
		dev_err(dev, "unsupported ABI version %u.%u\n", major,
			l->version_minor);
		return -EINVAL;
	}
	l->region_size = READ_ONCE(h->common.region_size);
	if (l->region_size > map_len || l->region_size % MB_PAGE_SIZE ||
	    l->region_size < sizeof(*h)) {
		dev_err(dev, "bad region size %llu (mapped %llu)\n",
			l->region_size, map_len);
		return -EINVAL;
	}
	l->header_size = READ_ONCE(h->common.header_size);
	if (l->header_size < sizeof(*h) || l->header_size % 8 ||
	    l->header_size > l->region_size) {
		dev_err(dev, "bad header size %u\n", l->header_size);
		return -EINVAL;
	}
	vcpu_count = READ_ONCE(h->common.vcpu_count);
	if (vcpu_count == 0 || vcpu_count > MB_MAX_VCPUS) {
		dev_err(dev, "bad vCPU count %u\n", vcpu_count);
		return -EINVAL;
	}

	err = mb_check_array(dev, "vcpus", READ_ONCE(h->vcpus.offset),
			     READ_ONCE(h->vcpus.capacity),
			     READ_ONCE(h->vcpus.stride),
			     sizeof(struct mb_vcpu_slot), MB_MAX_VCPUS, l,
			     &l->vcpus);
	if (err)
		return err;
	if (l->vcpus.capacity != vcpu_count) {
		dev_err(dev, "vcpus: capacity %u != vcpu_count %u\n",
			l->vcpus.capacity, vcpu_count);
		return -EINVAL;
	}
	err = mb_check_array(dev, "tasks", READ_ONCE(h->tasks.offset),
			     READ_ONCE(h->tasks.capacity),
			     READ_ONCE(h->tasks.stride),
			     sizeof(struct mb_task_entry), MB_MAX_TASKS, l,
			     &l->tasks);
	if (err)
		return err;
	err = mb_check_array(dev, "ring control", READ_ONCE(h->ring.ctl_offset),
			     1, sizeof(struct mb_ring_ctl),
			     sizeof(struct mb_ring_ctl), 1, l, &ctl);
	if (err)
		return err;
	l->ring_ctl = ctl.offset;
	err = mb_check_array(dev, "ring", READ_ONCE(h->ring.slots_offset),
			     READ_ONCE(h->ring.capacity),
			     READ_ONCE(h->ring.stride),
			     sizeof(struct mb_guest_sample),
			     MB_MAX_RING_RECORDS, l, &l->ring);
	if (err)
		return err;

	/* No two parts overlap. */
	starts[0] = 0;
	ends[0] = l->header_size;
	starts[1] = l->vcpus.offset;
	ends[1] = mb_array_end(&l->vcpus);
	starts[2] = l->tasks.offset;
	ends[2] = mb_array_end(&l->tasks);
	starts[3] = l->ring_ctl;
	ends[3] = l->ring_ctl + sizeof(struct mb_ring_ctl);
	starts[4] = l->ring.offset;
	ends[4] = mb_array_end(&l->ring);
	for (i = 0; i < ARRAY_SIZE(starts); i++) {
		for (j = i + 1; j < ARRAY_SIZE(starts); j++) {
			if (starts[i] < ends[j] && starts[j] < ends[i]) {
				dev_err(dev, "parts %u and %u overlap\n", i, j);
				return -EINVAL;
			}
		}
	}
	return 0;
}

/* ---- vCPU slots (seqlocked; one writer: the slot's own CPU) ----------------- */

static void mb_slot_write(struct mb_vcpu_slot *s, u64 switch_count,
			  u64 now_ns, u32 task_id, u32 pid, u32 tgid, u32 flags,
			  const char *comm)
{
	/* "| 1" also recovers a slot left odd by an interrupted writer. */
	u64 seq = READ_ONCE(s->seq) | 1;

	WRITE_ONCE(s->seq, seq);
	/* Readers that see any field below also see the odd seq. */
	smp_wmb();
	WRITE_ONCE(s->switch_count, switch_count);
	WRITE_ONCE(s->switch_time_ns, now_ns);
	WRITE_ONCE(s->task_id, task_id);
	WRITE_ONCE(s->pid, pid);
	WRITE_ONCE(s->tgid, tgid);
	WRITE_ONCE(s->flags, flags);
	mb_store_comm(s->comm, comm);
	/* Even again: the fields above are complete. */
	smp_store_release(&s->seq, seq + 1);
}

static void mb_slot_clear(struct mb_vcpu_slot *s)
{
	static const char none[MB_COMM_LEN];

	mb_slot_write(s, 0, 0, MB_TASK_NONE, 0, 0, 0, none);
}

static const struct mb_lookup_entry *
mb_lookup_find(const struct mb_lookup *lk, pid_t nr)
{
	unsigned int lo = 0, hi = lk->count;

	while (lo < hi) {
		unsigned int mid = lo + (hi - lo) / 2;
		pid_t cur = lk->entries[mid].nr;

		if (cur == nr)
			return &lk->entries[mid];
		if (cur < nr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

/* The task id @t runs under; called with preemption disabled. */
static u32 mb_task_id_of(struct mb_dev *mb, struct task_struct *t)
{
	const struct mb_lookup *lk = rcu_dereference_sched(mb->lookup);
	const struct mb_lookup_entry *e;

	if (!lk)
		return MB_TASK_NONE;
	/* A registered thread: the pid names this very thread. */
	e = mb_lookup_find(lk, t->pid);
	if (e && !e->process && e->pid == task_pid(t))
		return e->task_id;
	/* A registered process: the tgid names this thread's group. */
	e = mb_lookup_find(lk, t->tgid);
	if (e && e->process && e->pid == task_tgid(t))
		return e->task_id;
	return MB_TASK_NONE;
}

/* Announces that this CPU now runs @next; the slot of this CPU only. */
static void mb_slot_switch_to(struct mb_dev *mb, struct task_struct *next)
{
	unsigned int cpu = smp_processor_id();
	struct mb_vcpu_slot *s;
	u32 task_id = MB_TASK_NONE, flags = 0;

	if (cpu >= mb->l.vcpus.capacity)
		return;
	s = mb_slot(mb, cpu);
	if (is_idle_task(next))
		flags |= MB_VCPU_IDLE;
	else if (next->flags & PF_KTHREAD)
		flags |= MB_VCPU_KTHREAD;
	if (!flags)
		task_id = mb_task_id_of(mb, next);
	mb_slot_write(s, READ_ONCE(s->switch_count) + 1,
		      ktime_get_mono_fast_ns(), task_id, next->pid, next->tgid,
		      flags, next->comm);
}

static void mb_probe_sched_switch(void *data, bool preempt,
				  struct task_struct *prev,
				  struct task_struct *next,
				  unsigned int prev_state)
{
	mb_slot_switch_to(data, next);
}

/* IPI at attach: fill this CPU's slot with what it runs now. */
static void mb_slot_fill_current(void *data)
{
	mb_slot_switch_to(data, current);
}

static void mb_find_sched_switch(struct tracepoint *tp, void *priv)
{
	struct tracepoint **found = priv;

	if (!strcmp(tp->name, "sched_switch"))
		*found = tp;
}

static int mb_hook_sched_switch(struct mb_dev *mb)
{
	int err;

	for_each_kernel_tracepoint(mb_find_sched_switch, &mb->tp_switch);
	if (!mb->tp_switch)
		return -ENOENT;
	err = tracepoint_probe_register(mb->tp_switch,
					(void *)mb_probe_sched_switch, mb);
	if (err)
		return err;
	mb->tp_registered = true;
	on_each_cpu(mb_slot_fill_current, mb, 1);
	return 0;
}

static void mb_unhook_sched_switch(struct mb_dev *mb)
{
	if (!mb->tp_registered)
		return;
	tracepoint_probe_unregister(mb->tp_switch,
				    (void *)mb_probe_sched_switch, mb);
	/* No probe runs after this. */
	tracepoint_synchronize_unregister();
	mb->tp_registered = false;
}

/* ---- Task table (seqlocked; under region_lock) ------------------------------ */

static void mb_task_write(struct mb_task_entry *e, u64 registered_ns,
			  u64 unregistered_ns, u32 pid, u32 tgid, u32 state,
			  const char *comm)
{
	u64 seq = READ_ONCE(e->seq) | 1;

	WRITE_ONCE(e->seq, seq);
	/* Readers that see any field below also see the odd seq. */
	smp_wmb();
	WRITE_ONCE(e->pid, pid);
	WRITE_ONCE(e->tgid, tgid);
	WRITE_ONCE(e->state, state);
	WRITE_ONCE(e->flags, 0);
	mb_store_comm(e->comm, comm);
	WRITE_ONCE(e->registered_ns, registered_ns);
	WRITE_ONCE(e->unregistered_ns, unregistered_ns);
	/* Even again: the fields above are complete. */
	smp_store_release(&e->seq, seq + 1);
}

/*
 * A free task id: a free entry, else the entry unregistered longest ago.
 * Ids held by our own registrations are never handed out, whatever the
 * region says.
 */
static int mb_task_id_alloc(struct mb_dev *mb, u32 *id)
{
	u64 oldest = U64_MAX;
	bool found = false;
	u32 i;

	lockdep_assert_held(&mb->region_lock);
	for (i = 0; i < mb->l.tasks.capacity; i++) {
		struct mb_task_entry *e = mb_task(mb, i);
		u32 state;
		u64 at;

		if (test_bit(i, mb->task_ids))
			continue;
		state = READ_ONCE(e->state);
		if (state != MB_TASK_UNREGISTERED) {
			/* Free, or garbage, which is as good as free. */
			*id = i;
			return 0;
		}
		at = READ_ONCE(e->unregistered_ns);
		if (!found || at < oldest) {
			oldest = at;
			*id = i;
			found = true;
		}
	}
	return found ? 0 : -ENOSPC;
}

/* ---- Sample ring (single writer, under region_lock) ------------------------- */

static void mb_ring_push(struct mb_dev *mb, u64 now_ns, u32 task_id, u32 pid,
			 const struct mb_counters *c, u32 flags)
{
	struct mb_guest_sample *rec;
	u64 seq = mb->ring_next;
	u32 slot;

	lockdep_assert_held(&mb->region_lock);
	if (mb->ring_broken)
		return;
	if (seq + 1 >= MB_SEQ_WRITING) {
		/* 2^63 records: not in this universe, but never wrap. */
		mb->ring_broken = true;
		return;
	}
	div_u64_rem(seq, mb->l.ring.capacity, &slot);
	rec = mb_entry(mb, &mb->l.ring, slot);

	/* 1. Mark the slot: its old record is going away. */
	WRITE_ONCE(rec->seq, MB_SEQ_WRITING | seq);
	/* A reader that sees any payload store below also sees the mark. */
	smp_wmb();
	/* 2. The payload. */
	WRITE_ONCE(rec->timestamp_ns, now_ns);
	WRITE_ONCE(rec->task_id, task_id);
	WRITE_ONCE(rec->pid, pid);
	WRITE_ONCE(rec->min_flt, c->min_flt);
	WRITE_ONCE(rec->maj_flt, c->maj_flt);
	WRITE_ONCE(rec->utime_ns, c->utime_ns);
	WRITE_ONCE(rec->stime_ns, c->stime_ns);
	WRITE_ONCE(rec->cpu, c->cpu);
	WRITE_ONCE(rec->flags, flags);
	/* 3. The record is complete (release: after the payload). */
	smp_store_release(&rec->seq, seq);
	/* 4. And published (release: after the record). */
	smp_store_release(&mb->ctl->head, seq + 1);
	mb->ring_next = seq + 1;
}

/* ---- Counters ---------------------------------------------------------------- */

/*
 * Splits @rtime (precise CPU time) into user and system time in the ratio of
 * the tick-sampled @utime and @stime, never going backwards from the last
 * split.
 */
static void mb_split_cputime(struct mb_reg *reg, u64 rtime, u64 utime,
			     u64 stime, u64 *ut, u64 *st)
{
	u64 s;

	if (rtime <= reg->prev_utime + reg->prev_stime) {
		*ut = reg->prev_utime;
		*st = reg->prev_stime;
		return;
	}
	if (stime == 0)
		s = 0;
	else if (utime == 0)
		s = rtime;
	else
		s = mul_u64_u64_div_u64(stime, rtime, stime + utime);
	s = max(s, reg->prev_stime);
	if (rtime - s < reg->prev_utime)
		s = rtime - reg->prev_utime;
	reg->prev_stime = s;
	reg->prev_utime = rtime - s;
	*ut = reg->prev_utime;
	*st = reg->prev_stime;
}

/*
 * Counters of a whole thread group: the totals of its dead threads (kept in
 * signal_struct) plus those of every live thread, read consistently against
 * threads exiting (which move their counts to signal_struct under
 * stats_lock). User/system time come from raw task->utime/stime and are
 * scaled to the precise runtime; cpu is that of the thread that ran last.
 */
static void mb_read_process(struct mb_reg *reg, struct task_struct *leader,
			    struct mb_counters *c)
{
	struct signal_struct *sig = leader->signal;
	u64 min_flt, maj_flt, utime, stime, rtime, last_run;
	struct task_struct *t;
	unsigned long flags;
	int seq, nextseq = 0;
	u32 cpu;

	rcu_read_lock();
	do {
		seq = nextseq;
		flags = read_seqbegin_or_lock_irqsave(&sig->stats_lock, &seq);
		min_flt = sig->min_flt;
		maj_flt = sig->maj_flt;
		utime = sig->utime;
		stime = sig->stime;
		rtime = sig->sum_sched_runtime;
		cpu = task_cpu(leader);
		last_run = 0;
		for_each_thread(leader, t) {
			u64 ran = READ_ONCE(t->se.exec_start);

			min_flt += READ_ONCE(t->min_flt);
			maj_flt += READ_ONCE(t->maj_flt);
			utime += READ_ONCE(t->utime);
			stime += READ_ONCE(t->stime);
			rtime += READ_ONCE(t->se.sum_exec_runtime);
			if (ran >= last_run) {
				last_run = ran;
				cpu = task_cpu(t);
			}
		}
		/* If we have to retry, take the lock the second time. */
		nextseq = 1;
	} while (need_seqretry(&sig->stats_lock, seq));
	done_seqretry_irqrestore(&sig->stats_lock, seq, flags);
	rcu_read_unlock();

	c->min_flt = min_flt;
	c->maj_flt = maj_flt;
	mb_split_cputime(reg, rtime, utime, stime, &c->utime_ns, &c->stime_ns);
	c->cpu = cpu;
}

/* The registered task, with a reference, or NULL once it is gone. */
static struct task_struct *mb_reg_task(const struct mb_reg *reg)
{
	struct task_struct *t;

	rcu_read_lock();
	t = pid_task(reg->pid, reg->process ? PIDTYPE_TGID : PIDTYPE_PID);
	if (t)
		get_task_struct(t);
	rcu_read_unlock();
	return t;
}

/*
 * Reads @reg's absolute counters into @c. Returns false if the task (or, for
 * a process, every thread of it) has exited: @c then holds final values.
 */
static bool mb_read_counters(struct mb_reg *reg, struct mb_counters *c)
{
	struct task_struct *t = mb_reg_task(reg);
	bool alive;

	if (!t) {
		/* Already reaped: the last values we read are final. */
		*c = reg->last;
		return false;
	}
	if (reg->process) {
		mb_read_process(reg, t, c);
		alive = !(READ_ONCE(t->exit_state) && thread_group_empty(t));
	} else {
		c->min_flt = READ_ONCE(t->min_flt);
		c->maj_flt = READ_ONCE(t->maj_flt);
		task_cputime_adjusted(t, &c->utime_ns, &c->stime_ns);
		c->cpu = task_cpu(t);
		alive = !READ_ONCE(t->exit_state);
	}
	put_task_struct(t);
	/* Absolute counters never go backwards. */
	c->min_flt = max(c->min_flt, reg->last.min_flt);
	c->maj_flt = max(c->maj_flt, reg->last.maj_flt);
	c->utime_ns = max(c->utime_ns, reg->last.utime_ns);
	c->stime_ns = max(c->stime_ns, reg->last.stime_ns);
	reg->last = *c;
	return alive;
}

/* ---- Registrations (under mb->lock) ------------------------------------------ */

static int mb_lookup_cmp(const void *a, const void *b)
{
	const struct mb_lookup_entry *x = a, *y = b;

	return (x->nr > y->nr) - (x->nr < y->nr);
}

static void mb_lookup_free_rcu(struct rcu_head *head)
{
	struct mb_lookup *lk = container_of(head, struct mb_lookup, rcu);
	unsigned int i;

	for (i = 0; i < lk->count; i++)
		put_pid(lk->entries[i].pid);
	kfree(lk);
}

/* A snapshot of the registrations with @add added and @skip left out. */
static struct mb_lookup *mb_lookup_build(struct mb_dev *mb, struct mb_reg *add,
					 struct mb_reg *skip)
{
	unsigned int n = mb->nr_regs + (add ? 1 : 0) - (skip ? 1 : 0);
	struct mb_lookup *lk;
	struct mb_reg *reg;

	if (n == 0)
		return NULL;
	lk = kzalloc(struct_size(lk, entries, n), GFP_KERNEL);
	if (!lk)
		return ERR_PTR(-ENOMEM);
	list_for_each_entry(reg, &mb->regs, node) {
		if (reg == skip)
			continue;
		if (WARN_ON_ONCE(lk->count >= n))
			break;
		lk->entries[lk->count++] = (struct mb_lookup_entry){
			.nr = reg->nr, .task_id = reg->task_id,
			.pid = get_pid(reg->pid), .process = reg->process,
		};
	}
	if (add && lk->count < n) {
		lk->entries[lk->count++] = (struct mb_lookup_entry){
			.nr = add->nr, .task_id = add->task_id,
			.pid = get_pid(add->pid), .process = add->process,
		};
	}
	sort(lk->entries, lk->count, sizeof(lk->entries[0]), mb_lookup_cmp,
	     NULL);
	return lk;
}

static void mb_lookup_publish(struct mb_dev *mb, struct mb_lookup *lk)
{
	struct mb_lookup *old;

	old = rcu_replace_pointer(mb->lookup, lk, lockdep_is_held(&mb->lock));
	if (old)
		call_rcu(&old->rcu, mb_lookup_free_rcu);
}

static void mb_sampler_start(struct mb_dev *mb)
{
	lockdep_assert_held(&mb->lock);
	if (mb->sampling || mb->stopping)
		return;
	mb->sampling = true;
	/* A first sample now, then one per period. */
	queue_work(system_highpri_wq, &mb->sample_work);
	hrtimer_start(&mb->timer, ns_to_ktime(mb->period_ns),
		      HRTIMER_MODE_REL);
}

static void mb_sampler_stop(struct mb_dev *mb)
{
	lockdep_assert_held(&mb->lock);
	if (!mb->sampling)
		return;
	mb->sampling = false;
	/* The callback only queues the work, which then finds nothing to do. */
	hrtimer_cancel(&mb->timer);
}

static enum hrtimer_restart mb_timer_fn(struct hrtimer *timer)
{
	struct mb_dev *mb = container_of(timer, struct mb_dev, timer);

	queue_work(system_highpri_wq, &mb->sample_work);
	hrtimer_forward_now(timer, ns_to_ktime(READ_ONCE(mb->period_ns)));
	return HRTIMER_RESTART;
}

/* Drops @reg: table entry unregistered, snapshot rebuilt, reg freed. */
static int mb_unregister(struct mb_dev *mb, struct mb_reg *reg)
{
	struct mb_lookup *lk;
	struct mb_task_entry *e;

	lockdep_assert_held(&mb->lock);
	lk = mb_lookup_build(mb, NULL, reg);
	if (IS_ERR(lk))
		return PTR_ERR(lk);

	spin_lock(&mb->region_lock);
	e = mb_task(mb, reg->task_id);
	mb_task_write(e, READ_ONCE(e->registered_ns), ktime_get_ns(), reg->nr,
		      READ_ONCE(e->tgid), MB_TASK_UNREGISTERED, reg->comm);
	clear_bit(reg->task_id, mb->task_ids);
	spin_unlock(&mb->region_lock);

	list_del(&reg->node);
	mb->nr_regs--;
	mb_lookup_publish(mb, lk);
	put_pid(reg->pid);
	kfree(reg);
	if (list_empty(&mb->regs))
		mb_sampler_stop(mb);
	return 0;
}

static struct mb_reg *mb_find_reg(struct mb_dev *mb, struct pid *pid)
{
	struct mb_reg *reg;

	list_for_each_entry(reg, &mb->regs, node)
		if (reg->pid == pid)
			return reg;
	return NULL;
}

/* May the opener of @file profile @t? Same user, or CAP_SYS_PTRACE. */
static bool mb_may_profile(const struct file *file, struct task_struct *t)
{
	const struct cred *cred = file->f_cred;
	const struct cred *tcred;
	bool ok;

	if (file_ns_capable(file, &init_user_ns, CAP_SYS_PTRACE))
		return true;
	rcu_read_lock();
	tcred = __task_cred(t);
	ok = uid_eq(cred->euid, tcred->uid) && uid_eq(cred->euid, tcred->euid);
	rcu_read_unlock();
	return ok;
}

static int mb_register(struct mb_dev *mb, const struct file *file, int vnr)
{
	struct task_struct *t;
	struct mb_lookup *lk;
	struct mb_reg *reg;
	struct pid *pid;
	u32 id;
	int err;

	pid = find_get_pid(vnr);
	if (!pid)
		return -ESRCH;
	t = get_pid_task(pid, PIDTYPE_PID);
	if (!t) {
		err = -ESRCH;
		goto put_pid;
	}
	/* Kernel threads do not fault on user memory: nothing to profile. */
	if (t->flags & PF_KTHREAD) {
		err = -EINVAL;
		goto put_task;
	}
	if (!mb_may_profile(file, t)) {
		err = -EPERM;
		goto put_task;
	}
	reg = kzalloc(sizeof(*reg), GFP_KERNEL);
	if (!reg) {
		err = -ENOMEM;
		goto put_task;
	}
	reg->process = thread_group_leader(t);
	reg->pid = pid;			/* the reference moves to reg */
	reg->nr = reg->process ? task_tgid_nr(t) : task_pid_nr(t);
	reg->owner = file->f_cred->euid;
	get_task_comm(reg->comm, t);
	pid = NULL;

	mutex_lock(&mb->lock);
	if (mb->stopping) {
		err = -ENODEV;
		goto unlock;
	}
	if (mb_find_reg(mb, reg->pid)) {
		err = -EEXIST;
		goto unlock;
	}
	if (mb->nr_regs >= mb->max_regs) {
		err = -ENOSPC;
		goto unlock;
	}
	/* Baseline counters, so that an early exit still has final values. */
	mb_read_counters(reg, &reg->last);

	spin_lock(&mb->region_lock);
	err = mb_task_id_alloc(mb, &id);
	spin_unlock(&mb->region_lock);
	if (err)
		goto unlock;
	reg->task_id = id;
	lk = mb_lookup_build(mb, reg, NULL);
	if (IS_ERR(lk)) {
		err = PTR_ERR(lk);
		goto unlock;
	}

	spin_lock(&mb->region_lock);
	set_bit(id, mb->task_ids);
	mb_task_write(mb_task(mb, id), ktime_get_ns(), 0, task_pid_nr(t),
		      task_tgid_nr(t), MB_TASK_REGISTERED, reg->comm);
	spin_unlock(&mb->region_lock);

	list_add_tail(&reg->node, &mb->regs);
	mb->nr_regs++;
	mb_lookup_publish(mb, lk);
	mb_sampler_start(mb);
	reg = NULL;
unlock:
	mutex_unlock(&mb->lock);
	if (reg) {
		put_pid(reg->pid);
		kfree(reg);
	}
put_task:
	put_task_struct(t);
put_pid:
	put_pid(pid);
	return err;
}

static int mb_unregister_vnr(struct mb_dev *mb, const struct file *file,
			     int vnr)
{
	struct mb_reg *reg, *found = NULL;
	int err;

	mutex_lock(&mb->lock);
	list_for_each_entry(reg, &mb->regs, node) {
		if (pid_vnr(reg->pid) == vnr) {
			found = reg;
			break;
		}
	}
	if (!found)
		err = -ENOENT;
	else if (!uid_eq(found->owner, file->f_cred->euid) &&
		 !file_ns_capable(file, &init_user_ns, CAP_SYS_PTRACE))
		err = -EPERM;
	else
		err = mb_unregister(mb, found);
	mutex_unlock(&mb->lock);
	return err;
}

/* ---- Sampler ------------------------------------------------------------------ */

static void mb_sample_work_fn(struct work_struct *work)
{
	struct mb_dev *mb = container_of(work, struct mb_dev, sample_work);
	struct mb_reg *reg, *tmp;

	mutex_lock(&mb->lock);
	if (!mb->sampling || mb->stopping)
		goto out;
	list_for_each_entry_safe(reg, tmp, &mb->regs, node) {
		struct mb_counters c;
		bool alive;

		if (!reg->exited) {
			alive = mb_read_counters(reg, &c);
			spin_lock(&mb->region_lock);
			mb_ring_push(mb, ktime_get_ns(), reg->task_id, reg->nr,
				     &c, alive ? 0 : MB_SAMPLE_EXITED);
			spin_unlock(&mb->region_lock);
			if (alive)
				continue;
			reg->exited = true;
		}
		/* Exited: final sample written; retried if memory is short. */
		mb_unregister(mb, reg);
	}
out:
	mutex_unlock(&mb->lock);
}

/* ---- Period -------------------------------------------------------------------- */

static void mb_apply_period(struct mb_dev *mb, u64 ns)
{
	lockdep_assert_held(&mb->lock);
	WRITE_ONCE(mb->period_ns, ns);
	/* Live header field; release like the Rust writer. */
	smp_store_release(&mb->hdr->common.sample_period_ns, ns);
	if (mb->sampling) {
		/* Restart on the new period (never touch a running timer). */
		hrtimer_cancel(&mb->timer);
		hrtimer_start(&mb->timer, ns_to_ktime(ns), HRTIMER_MODE_REL);
	}
}

static bool mb_period_ok(u64 ns)
{
	return ns >= MB_PERIOD_MIN_NS && ns <= MB_PERIOD_MAX_NS;
}

/* A period the guest asks for: applied here and forwarded to the device. */
static int mb_request_period(struct mb_dev *mb, u64 ns)
{
	if (!mb_period_ok(ns))
		return -EINVAL;
	/* Without CONFIG_HIGH_RES_TIMERS, hrtimers tick at 1/HZ. */
	if (ns < hrtimer_resolution)
		pr_warn_once("period %llu ns is below the timer resolution (%u ns): CONFIG_HIGH_RES_TIMERS=y is needed\n",
			     ns, hrtimer_resolution);
	mutex_lock(&mb->lock);
	mb->period_from_user = true;
	mb_apply_period(mb, ns);
	if (mb->can_request_period)
		virtio_cwrite_le(mb->vdev, struct mb_virtio_config,
				 requested_period_ns, &ns);
	mutex_unlock(&mb->lock);
	return 0;
}

/* The host changed the configuration: follow its default period. */
static void mb_config_work_fn(struct work_struct *work)
{
	struct mb_dev *mb = container_of(work, struct mb_dev, config_work);
	u64 ns;

	mutex_lock(&mb->lock);
	if (!mb->stopping && !mb->period_from_user) {
		virtio_cread_le(mb->vdev, struct mb_virtio_config,
				default_period_ns, &ns);
		if (mb_period_ok(ns) && ns != mb->period_ns)
			mb_apply_period(mb, ns);
	}
	mutex_unlock(&mb->lock);
}

static void mb_config_changed(struct virtio_device *vdev)
{
	struct mb_dev *mb = vdev->priv;

	if (mb)
		schedule_work(&mb->config_work);
}

/* ---- /proc/mirrorball ------------------------------------------------------------ */

static int mb_status_show(struct seq_file *m, void *v)
{
	struct mb_dev *mb = m->private;
	struct mb_reg *reg;

	mutex_lock(&mb->lock);
	list_for_each_entry(reg, &mb->regs, node)
		seq_printf(m, "%d %u %s %s\n", pid_vnr(reg->pid), reg->task_id,
			   reg->process ? "process" : "thread", reg->comm);
	mutex_unlock(&mb->lock);
	return 0;
}

static int mb_status_open(struct inode *inode, struct file *file)
{
	return single_open(file, mb_status_show, pde_data(inode));
}

static ssize_t mb_status_write(struct file *file, const char __user *ubuf,
			       size_t len, loff_t *off)
{
	struct mb_dev *mb = pde_data(file_inode(file));
	char buf[MB_CMD_MAX];
	char *arg, cmd;
	int vnr, err;

	if (len == 0 || len >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, len))
		return -EFAULT;
	buf[len] = '\0';
	arg = strim(buf);
	/* "<cmd> <pid>" */
	cmd = arg[0];
	if (!cmd || !isspace(arg[1]))
		return -EINVAL;
	err = kstrtoint(skip_spaces(arg + 1), 10, &vnr);
	if (err)
		return err;
	if (vnr <= 0)
		return -EINVAL;
	switch (cmd) {
	case 'R':
		err = mb_register(mb, file, vnr);
		break;
	case 'U':
		err = mb_unregister_vnr(mb, file, vnr);
		break;
	default:
		err = -EINVAL;
	}
	return err ? err : len;
}

static const struct proc_ops mb_status_ops = {
	.proc_open = mb_status_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = mb_status_write,
};

static int mb_period_show(struct seq_file *m, void *v)
{
	struct mb_dev *mb = m->private;

	seq_printf(m, "%llu\n", READ_ONCE(mb->period_ns));
	return 0;
}

static int mb_period_open(struct inode *inode, struct file *file)
{
	return single_open(file, mb_period_show, pde_data(inode));
}

static ssize_t mb_period_write(struct file *file, const char __user *ubuf,
			       size_t len, loff_t *off)
{
	struct mb_dev *mb = pde_data(file_inode(file));
	u64 ns;
	int err;

	if (len == 0 || len >= MB_CMD_MAX)
		return -EINVAL;
	err = kstrtou64_from_user(ubuf, len, 10, &ns);
	if (err)
		return err;
	err = mb_request_period(mb, ns);
	return err ? err : len;
}

static const struct proc_ops mb_period_ops = {
	.proc_open = mb_period_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = mb_period_write,
};

static int mb_proc_create(struct mb_dev *mb)
{
	mb->proc_dir = proc_mkdir("mirrorball", NULL);
	if (!mb->proc_dir)
		return -ENOMEM;
	/* Writable by root; each write is checked against the task, too. */
	if (!proc_create_data("status", 0644, mb->proc_dir, &mb_status_ops,
			      mb) ||
	    !proc_create_data("period_ns", 0644, mb->proc_dir, &mb_period_ops,
			      mb)) {
		proc_remove(mb->proc_dir);
		mb->proc_dir = NULL;
		return -ENOMEM;
	}
	return 0;
}

/* ---- /dev/mirrorball ------------------------------------------------------------ */

static int mb_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct mb_dev *mb;
	int err;

	/* Read-only: no writable mapping now, and none through mprotect(). */
	if (vma->vm_flags & (VM_WRITE | VM_EXEC))
		return -EPERM;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_clear(vma, VM_MAYWRITE | VM_MAYEXEC);
	vm_flags_set(vma, VM_DONTEXPAND | VM_DONTDUMP);
#else
	vma->vm_flags &= ~(VM_MAYWRITE | VM_MAYEXEC);
	vma->vm_flags |= VM_DONTEXPAND | VM_DONTDUMP;
#endif
	mutex_lock(&mb_global_lock);
	mb = mb_attached;
	if (!mb) {
		err = -ENODEV;
	} else {
		/* Bounded by the validated region size, checked per offset. */
		err = vm_iomap_memory(vma, mb->phys, mb->l.region_size);
	}
	mutex_unlock(&mb_global_lock);
	return err;
}

static const struct file_operations mb_dev_fops = {
	.owner = THIS_MODULE,
	.mmap = mb_mmap,
	.llseek = noop_llseek,
};

/* ---- virtio driver ---------------------------------------------------------------- */

/* Maps the shared region and validates it; fills mb->base, mb->l. */
static int mb_map_region(struct mb_dev *mb)
{
	struct device *dev = &mb->vdev->dev;
	struct virtio_shm_region shm;
	struct mb_guest_header *h;
	u64 size;
	int err;

	if (!virtio_get_shm_region(mb->vdev, &shm, MB_SHMID_GUEST_REGION)) {
		dev_err(dev, "no shared memory region %d\n",
			MB_SHMID_GUEST_REGION);
		return -ENODEV;
	}
	if (!PAGE_ALIGNED(shm.addr) || shm.len < MB_PAGE_SIZE ||
	    shm.addr + shm.len < shm.addr) {
		dev_err(dev, "bad shared memory region %#llx+%#llx\n",
			shm.addr, shm.len);
		return -EINVAL;
	}
	mb->phys = shm.addr;

	/* The header says how much to map. */
	h = memremap(shm.addr, MB_PAGE_SIZE, MEMREMAP_WB);
	if (!h)
		return -ENOMEM;
	size = READ_ONCE(h->common.region_size);
	memunmap(h);
	if (size < MB_PAGE_SIZE || size > shm.len || size > MB_REGION_MAX ||
	    !PAGE_ALIGNED(size)) {
		dev_err(dev, "bad region size %llu (shared memory %llu)\n",
			size, shm.len);
		return -EINVAL;
	}
	mb->base = memremap(shm.addr, size, MEMREMAP_WB);
	if (!mb->base)
		return -ENOMEM;
	err = mb_validate(dev, mb->base, size, &mb->l);
	if (err) {
		memunmap(mb->base);
		mb->base = NULL;
		return err;
	}
	mb->hdr = mb->base;
	mb->ctl = (struct mb_ring_ctl *)((u8 *)mb->base + mb->l.ring_ctl);
	return 0;
}

static u64 mb_initial_period(struct mb_dev *mb)
{
	u64 ns;

	if (period_ns) {
		if (mb_period_ok(period_ns)) {
			mb->period_from_user = true;
			return period_ns;
		}
		dev_warn(&mb->vdev->dev, "period_ns=%lu out of range, ignored\n",
			 period_ns);
	}
	virtio_cread_le(mb->vdev, struct mb_virtio_config, default_period_ns,
			&ns);
	return mb_period_ok(ns) ? ns : MB_PERIOD_DEFAULT_NS;
}

static void mb_clear_tables(struct mb_dev *mb)
{
	static const char none[MB_COMM_LEN];
	u32 i;

	for (i = 0; i < mb->l.vcpus.capacity; i++)
		mb_slot_clear(mb_slot(mb, i));
	for (i = 0; i < mb->l.tasks.capacity; i++)
		mb_task_write(mb_task(mb, i), 0, 0, 0, 0, MB_TASK_FREE, none);
}

static int mb_probe(struct virtio_device *vdev)
{
	struct device *dev = &vdev->dev;
	struct mb_dev *mb;
	u16 cfg_major;
	u32 cfg_vcpus;
	u64 head, boot_id;
	int err;

	mutex_lock(&mb_global_lock);
	if (mb_attached) {
		dev_err(dev, "a profiler device is already attached\n");
		err = -EBUSY;
		goto unlock_global;
	}
	virtio_cread_le(vdev, struct mb_virtio_config, abi_version_major,
			&cfg_major);
	if (cfg_major != MB_ABI_VERSION_MAJOR) {
		dev_err(dev, "device speaks ABI %u, driver %u\n", cfg_major,
			MB_ABI_VERSION_MAJOR);
		err = -EINVAL;
		goto unlock_global;
	}
	mb = kzalloc(sizeof(*mb), GFP_KERNEL);
	if (!mb) {
		err = -ENOMEM;
		goto unlock_global;
	}
	mb->vdev = vdev;
	spin_lock_init(&mb->region_lock);
	mutex_init(&mb->lock);
	INIT_LIST_HEAD(&mb->regs);
	INIT_WORK(&mb->sample_work, mb_sample_work_fn);
	INIT_WORK(&mb->config_work, mb_config_work_fn);
	hrtimer_init(&mb->timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL);
	mb->timer.function = mb_timer_fn;
	mb->can_request_period = virtio_has_feature(vdev, MB_F_PERIOD_CONTROL);

	err = mb_map_region(mb);
	if (err)
		goto free_mb;
	head = READ_ONCE(mb->ctl->head);
	if (head < MB_SEQ_FIRST || head & MB_SEQ_WRITING) {
		dev_err(dev, "bad ring head %#llx\n", head);
		err = -EINVAL;
		goto unmap;
	}
	mb->ring_next = head;
	virtio_cread_le(vdev, struct mb_virtio_config, vcpu_count, &cfg_vcpus);
	if (cfg_vcpus != mb->l.vcpus.capacity)
		dev_warn(dev, "config says %u vCPUs, region has %u slots\n",
			 cfg_vcpus, mb->l.vcpus.capacity);
	if (nr_cpu_ids > mb->l.vcpus.capacity)
		dev_warn(dev, "CPUs %u and above have no slot\n",
			 mb->l.vcpus.capacity);
	mb->max_regs = min(mb->l.tasks.capacity, MB_MAX_REGISTERED);
	mb->task_ids = bitmap_zalloc(mb->l.tasks.capacity, GFP_KERNEL);
	if (!mb->task_ids) {
		err = -ENOMEM;
		goto unmap;
	}

	/* Attach: fresh tables, our boot id and period; the ring continues. */
	mb_clear_tables(mb);
	do {
		boot_id = get_random_u64();
	} while (!boot_id);
	/* Published with release, after the cleared tables. */
	smp_store_release(&mb->hdr->guest_boot_id, boot_id);
	mb->period_ns = mb_initial_period(mb);
	/* Live header field; release like the Rust writer. */
	smp_store_release(&mb->hdr->common.sample_period_ns, mb->period_ns);
	vdev->priv = mb;
	virtio_device_ready(vdev);
	if (mb->period_from_user && mb->can_request_period)
		virtio_cwrite_le(vdev, struct mb_virtio_config,
				 requested_period_ns, &mb->period_ns);

	err = mb_hook_sched_switch(mb);
	if (err) {
		dev_err(dev, "cannot hook sched_switch: %d\n", err);
		goto reset;
	}
	err = mb_proc_create(mb);
	if (err)
		goto unhook;
	mb->misc.minor = MISC_DYNAMIC_MINOR;
	mb->misc.name = "mirrorball";
	mb->misc.fops = &mb_dev_fops;
	mb->misc.mode = 0444;
	err = misc_register(&mb->misc);
	if (err)
		goto remove_proc;
	mb->misc_registered = true;

	mb_attached = mb;
	mutex_unlock(&mb_global_lock);
	pr_info("profiler ready: region %llu bytes, %u vcpus, period %llu ns\n",
		mb->l.region_size, mb->l.vcpus.capacity, mb->period_ns);
	return 0;

remove_proc:
	proc_remove(mb->proc_dir);
unhook:
	mb_unhook_sched_switch(mb);
reset:
	virtio_reset_device(vdev);
	vdev->priv = NULL;
	mb_clear_tables(mb);
	bitmap_free(mb->task_ids);
unmap:
	memunmap(mb->base);
free_mb:
	kfree(mb);
unlock_global:
	mutex_unlock(&mb_global_lock);
	return err;
}

static void mb_remove(struct virtio_device *vdev)
{
	struct mb_dev *mb = vdev->priv;
	struct mb_reg *reg, *tmp;
	struct mb_lookup *old;
	u32 i;

	/* No new users: /dev and /proc go first (proc_remove waits). */
	mutex_lock(&mb_global_lock);
	mb_attached = NULL;
	mutex_unlock(&mb_global_lock);
	if (mb->misc_registered)
		misc_deregister(&mb->misc);
	proc_remove(mb->proc_dir);

	/* Stop the sampler. */
	mutex_lock(&mb->lock);
	mb->stopping = true;
	mb_sampler_stop(mb);
	mutex_unlock(&mb->lock);
	cancel_work_sync(&mb->sample_work);
	cancel_work_sync(&mb->config_work);

	/* Unhook the probe, then nothing but us writes the region. */
	mb_unhook_sched_switch(mb);

	mutex_lock(&mb->lock);
	spin_lock(&mb->region_lock);
	list_for_each_entry_safe(reg, tmp, &mb->regs, node) {
		struct mb_task_entry *e = mb_task(mb, reg->task_id);

		mb_task_write(e, READ_ONCE(e->registered_ns), ktime_get_ns(),
			      reg->nr, READ_ONCE(e->tgid),
			      MB_TASK_UNREGISTERED, reg->comm);
		list_del(&reg->node);
		put_pid(reg->pid);
		kfree(reg);
	}
	mb->nr_regs = 0;
	spin_unlock(&mb->region_lock);
	old = rcu_replace_pointer(mb->lookup, NULL, lockdep_is_held(&mb->lock));
	mutex_unlock(&mb->lock);
	if (old)
		call_rcu(&old->rcu, mb_lookup_free_rcu);
	/* Our RCU callbacks are done before the module can go. */
	rcu_barrier();

	for (i = 0; i < mb->l.vcpus.capacity; i++)
		mb_slot_clear(mb_slot(mb, i));
	virtio_reset_device(vdev);
	vdev->priv = NULL;
	memunmap(mb->base);
	bitmap_free(mb->task_ids);
	kfree(mb);
}

static const unsigned int mb_features[] = {
	MB_F_PERIOD_CONTROL,
};

static const struct virtio_device_id mb_id_table[] = {
	{ VIRTIO_ID_MIRRORBALL, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, mb_id_table);

static int mb_validate_features(struct virtio_device *vdev)
{
	/* The config space is little endian: a modern device only. */
	if (!virtio_has_feature(vdev, VIRTIO_F_VERSION_1)) {
		dev_err(&vdev->dev, "device lacks VIRTIO_F_VERSION_1\n");
		return -EINVAL;
	}
	return 0;
}

static struct virtio_driver mb_driver = {
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = mb_id_table,
	.feature_table = mb_features,
	.feature_table_size = ARRAY_SIZE(mb_features),
	.validate = mb_validate_features,
	.probe = mb_probe,
	.remove = mb_remove,
	.config_changed = mb_config_changed,
};

module_virtio_driver(mb_driver);

MODULE_DESCRIPTION("Mirrorball page-fault profiler (guest side)");
MODULE_LICENSE("Dual MIT/GPL");
