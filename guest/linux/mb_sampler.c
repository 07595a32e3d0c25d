// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Registered tasks and their sampling: reading a task's absolute counters,
 * registering and unregistering tasks (with the RCU lookup snapshot the
 * sched_switch probe uses), the periodic sampler that pushes one ring record
 * per task, and the sampling period.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/err.h>
#include <linux/hrtimer.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/math64.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/pid.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include <linux/sched/cputime.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/seqlock.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/spinlock.h>
#include <linux/virtio_config.h>
#include <linux/workqueue.h>

#include "mirrorball.h"

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

void mb_lookup_free_rcu(struct rcu_head *head)
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

void mb_sampler_stop(struct mb_dev *mb)
{
	lockdep_assert_held(&mb->lock);
	if (!mb->sampling)
		return;
	mb->sampling = false;
	/* The callback only queues the work, which then finds nothing to do. */
	hrtimer_cancel(&mb->timer);
}

enum hrtimer_restart mb_timer_fn(struct hrtimer *timer)
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

int mb_register(struct mb_dev *mb, const struct file *file, int vnr)
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

int mb_unregister_vnr(struct mb_dev *mb, const struct file *file, int vnr)
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

void mb_sample_work_fn(struct work_struct *work)
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

/* A period the guest asks for: applied here and forwarded to the device. */
int mb_request_period(struct mb_dev *mb, u64 ns)
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
void mb_config_work_fn(struct work_struct *work)
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
