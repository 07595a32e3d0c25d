// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The virtio driver of the profiler device: maps and validates the guest
 * region (shared memory region 0), attaches (probe) and detaches (remove) the
 * driver, follows configuration changes, and holds the module parameters and
 * the attached device.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/cpumask.h>
#include <linux/hrtimer.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pid.h>
#include <linux/proc_fs.h>
#include <linux/random.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/workqueue.h>

#include "mirrorball.h"

static unsigned long period_ns;
module_param(period_ns, ulong, 0444);
MODULE_PARM_DESC(period_ns,
		 "Initial sampling period in ns (1 ms .. 60 s; 0 = the device's default)");

/* The attached device, for /dev/mirrorball (one profiler device per VM). */
DEFINE_MUTEX(mb_global_lock);
struct mb_dev *mb_attached;

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
	mb->switch_doorbell = virtio_has_feature(vdev, MB_F_SWITCH_DOORBELL);

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

static void mb_config_changed(struct virtio_device *vdev)
{
	struct mb_dev *mb = vdev->priv;

	if (mb)
		schedule_work(&mb->config_work);
}

static const unsigned int mb_features[] = {
	MB_F_PERIOD_CONTROL,
	MB_F_SWITCH_DOORBELL,
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
