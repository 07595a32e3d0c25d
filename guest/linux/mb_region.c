// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The guest region itself: its validation (profiler/ABI.md section 6) and
 * every write into it. The vCPU slots with the sched_switch probe that fills
 * them, the task table, and the sample ring.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/device.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/math64.h>
#include <linux/overflow.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/smp.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/tracepoint.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

#include "mirrorball.h"

/* ---- Region access --------------------------------------------------------- */

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
int mb_validate(struct device *dev, const void *base, u64 map_len,
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

void mb_slot_clear(struct mb_vcpu_slot *s)
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

/*
 * Rings the switch doorbell: the host closes this vCPU's accounting interval
 * now, charging it to the task the slot still names (the outgoing one). Called
 * with preemption off, before the slot is rewritten. The transport's set()
 * is a plain MMIO store; virtio_cwrite*() is not used because it may sleep.
 */
static void mb_ring_switch_doorbell(struct mb_dev *mb, unsigned int cpu)
{
	__le32 v = cpu_to_le32(cpu);

	if (!mb->switch_doorbell)
		return;
	mb->vdev->config->set(mb->vdev,
			      offsetof(struct mb_virtio_config, switch_doorbell),
			      &v, sizeof(v));
}

/* Announces that this CPU now runs @next; the slot of this CPU only. */
static void mb_slot_switch_to(struct mb_dev *mb, struct task_struct *next)
{
	unsigned int cpu = smp_processor_id();
	struct mb_vcpu_slot *s;
	u32 task_id = MB_TASK_NONE, flags = 0;

	if (cpu >= mb->l.vcpus.capacity)
		return;
	mb_ring_switch_doorbell(mb, cpu);
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

int mb_hook_sched_switch(struct mb_dev *mb)
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

void mb_unhook_sched_switch(struct mb_dev *mb)
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

void mb_task_write(struct mb_task_entry *e, u64 registered_ns,
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
int mb_task_id_alloc(struct mb_dev *mb, u32 *id)
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

void mb_ring_push(struct mb_dev *mb, u64 now_ns, u32 task_id, u32 pid,
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
