// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * TEST ONLY: a stand-in for the VMM's profiler device, so the real driver can
 * be exercised in a guest that has no Mirrorball VMM (e.g. QEMU TCG).
 *
 * It formats a guest region in guest RAM the way the VMM does
 * (GuestRegionLayout::new + GuestRegion::format in profiler/abi), and
 * registers a virtio device 0x4d42 whose shared memory region 0 is that
 * region and whose config space follows the device contract. Loading it
 * makes the driver probe; unloading it makes the driver remove.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/gfp.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/random.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

#include "mirrorball_abi.h"

static unsigned int tasks = 64;
module_param(tasks, uint, 0444);
static unsigned int ring_records = 4096;
module_param(ring_records, uint, 0444);
static unsigned int vcpus;
module_param(vcpus, uint, 0444);
MODULE_PARM_DESC(vcpus, "vCPU slots (0 = nr_cpu_ids)");

/* Config space offsets (the device contract). */
#define CFG_MAJOR 0x00
#define CFG_MINOR 0x02
#define CFG_VCPUS 0x04
#define CFG_DEFAULT 0x08
#define CFG_REQUESTED 0x10
#define CFG_HOST_REGION 0x18
#define CFG_FLAGS 0x20
#define CFG_SIZE 0x24

struct fake_dev {
	struct virtio_device vdev;
	void *region;
	size_t size;
	u8 status;
	spinlock_t lock;
	u8 cfg[CFG_SIZE];
	u8 staged[8];
};

static struct fake_dev *fake;

static void put_le(u8 *cfg, unsigned int off, u64 v, unsigned int len)
{
	unsigned int i;

	for (i = 0; i < len; i++)
		cfg[off + i] = v >> (8 * i);
}

static u64 align_up(u64 v, u64 a)
{
	return (v + a - 1) / a * a;
}

/* GuestRegionLayout::new + GuestRegion::format. */
static int fake_format(struct fake_dev *f, u32 nr_vcpus)
{
	u64 vcpus_off, tasks_off, ctl_off, slots_off, end;
	struct mb_guest_header *h;
	struct mb_ring_ctl *ctl;
	u32 i;

	vcpus_off = align_up(MB_HEADER_SIZE, MB_CACHE_LINE);
	tasks_off = align_up(vcpus_off + (u64)nr_vcpus * 64, MB_CACHE_LINE);
	ctl_off = align_up(tasks_off + (u64)tasks * 64, MB_CACHE_LINE);
	slots_off = align_up(ctl_off + 64, MB_CACHE_LINE);
	end = slots_off + (u64)ring_records * 64;
	f->size = align_up(end, MB_PAGE_SIZE);

	f->region = alloc_pages_exact(f->size, GFP_KERNEL | __GFP_ZERO);
	if (!f->region)
		return -ENOMEM;
	h = f->region;
	WRITE_ONCE(h->common.magic, 0);
	smp_wmb();
	ctl = f->region + ctl_off;
	WRITE_ONCE(ctl->head, MB_SEQ_FIRST);
	for (i = 0; i < nr_vcpus; i++) {
		struct mb_vcpu_slot *s = f->region + vcpus_off + (u64)i * 64;

		WRITE_ONCE(s->task_id, MB_TASK_NONE);
	}
	h->common.version_major = MB_ABI_VERSION_MAJOR;
	h->common.version_minor = MB_ABI_VERSION_MINOR;
	h->common.header_size = MB_HEADER_SIZE;
	h->common.region_size = f->size;
	h->common.generation = get_random_u64();
	h->common.sample_period_ns = 50000000;
	h->common.vcpu_count = nr_vcpus;
	h->common.clock_id = MB_CLOCK_MONOTONIC;
	h->vcpus.offset = vcpus_off;
	h->vcpus.capacity = nr_vcpus;
	h->vcpus.stride = sizeof(struct mb_vcpu_slot);
	h->tasks.offset = tasks_off;
	h->tasks.capacity = tasks;
	h->tasks.stride = sizeof(struct mb_task_entry);
	h->ring.ctl_offset = ctl_off;
	h->ring.slots_offset = slots_off;
	h->ring.capacity = ring_records;
	h->ring.stride = sizeof(struct mb_guest_sample);
	/* The magic last, with release. */
	smp_store_release(&h->common.magic, MB_GUEST_MAGIC);
	return 0;
}

static struct fake_dev *to_fake(struct virtio_device *vdev)
{
	return container_of(vdev, struct fake_dev, vdev);
}

static void fake_get(struct virtio_device *vdev, unsigned int off, void *buf,
		     unsigned int len)
{
	struct fake_dev *f = to_fake(vdev);

	if (off > CFG_SIZE || len > CFG_SIZE - off) {
		pr_err("config read %u+%u out of range\n", off, len);
		memset(buf, 0xff, len);
		return;
	}
	spin_lock(&f->lock);
	memcpy(buf, f->cfg + off, len);
	spin_unlock(&f->lock);
}

static void fake_set(struct virtio_device *vdev, unsigned int off,
		     const void *buf, unsigned int len)
{
	struct fake_dev *f = to_fake(vdev);
	u64 v = 0;
	int i;

	if (off < CFG_REQUESTED || off > CFG_REQUESTED + 8 ||
	    len > CFG_REQUESTED + 8 - off) {
		pr_err("config write %u+%u refused\n", off, len);
		return;
	}
	spin_lock(&f->lock);
	memcpy(f->staged + (off - CFG_REQUESTED), buf, len);
	/* Commits when the last byte is written, like the real device. */
	if (off + len == CFG_REQUESTED + 8) {
		memcpy(f->cfg + CFG_REQUESTED, f->staged, 8);
		for (i = 7; i >= 0; i--)
			v = (v << 8) | f->staged[i];
	}
	spin_unlock(&f->lock);
	if (off + len == CFG_REQUESTED + 8)
		pr_info("requested_period_ns = %llu\n", v);
}

static u8 fake_get_status(struct virtio_device *vdev)
{
	return READ_ONCE(to_fake(vdev)->status);
}

static void fake_set_status(struct virtio_device *vdev, u8 status)
{
	WRITE_ONCE(to_fake(vdev)->status, status);
}

static void fake_reset(struct virtio_device *vdev)
{
	WRITE_ONCE(to_fake(vdev)->status, 0);
}

static u64 fake_get_features(struct virtio_device *vdev)
{
	return BIT_ULL(VIRTIO_F_VERSION_1) | BIT_ULL(0);
}

static int fake_finalize_features(struct virtio_device *vdev)
{
	return 0;
}

static const char *fake_bus_name(struct virtio_device *vdev)
{
	return "mirrorball-fake";
}

static bool fake_get_shm_region(struct virtio_device *vdev,
				struct virtio_shm_region *region, u8 id)
{
	struct fake_dev *f = to_fake(vdev);

	if (id != 0)
		return false;
	region->addr = virt_to_phys(f->region);
	region->len = f->size;
	return true;
}

static int fake_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
			 struct virtqueue *vqs[], vq_callback_t *callbacks[],
			 const char * const names[], const bool *ctx,
			 struct irq_affinity *desc)
{
	return nvqs ? -ENOENT : 0;
}

static void fake_del_vqs(struct virtio_device *vdev)
{
}

static const struct virtio_config_ops fake_ops = {
	.get = fake_get,
	.set = fake_set,
	.get_status = fake_get_status,
	.set_status = fake_set_status,
	.reset = fake_reset,
	.find_vqs = fake_find_vqs,
	.del_vqs = fake_del_vqs,
	.get_features = fake_get_features,
	.finalize_features = fake_finalize_features,
	.bus_name = fake_bus_name,
	.get_shm_region = fake_get_shm_region,
};

static void fake_release(struct device *dev)
{
	/* Freed in fake_exit, after unregistering. */
}

static int __init fake_init(void)
{
	u32 nr_vcpus = vcpus ? vcpus : nr_cpu_ids;
	int err;

	if (!tasks || tasks > MB_MAX_TASKS || !ring_records ||
	    ring_records > (1U << 16) || nr_vcpus > MB_MAX_VCPUS)
		return -EINVAL;
	fake = kzalloc(sizeof(*fake), GFP_KERNEL);
	if (!fake)
		return -ENOMEM;
	spin_lock_init(&fake->lock);
	err = fake_format(fake, nr_vcpus);
	if (err)
		goto free;
	put_le(fake->cfg, CFG_MAJOR, MB_ABI_VERSION_MAJOR, 2);
	put_le(fake->cfg, CFG_MINOR, MB_ABI_VERSION_MINOR, 2);
	put_le(fake->cfg, CFG_VCPUS, nr_vcpus, 4);
	put_le(fake->cfg, CFG_DEFAULT, 50000000, 8);
	put_le(fake->cfg, CFG_HOST_REGION, 0x1234, 8);
	put_le(fake->cfg, CFG_FLAGS, 0, 4);

	fake->vdev.id.device = 0x4d42;
	fake->vdev.id.vendor = 0x4c42524d;
	fake->vdev.config = &fake_ops;
	fake->vdev.dev.release = fake_release;
	err = register_virtio_device(&fake->vdev);
	if (err) {
		put_device(&fake->vdev.dev);
		goto free_region;
	}
	pr_info("fake profiler device: region %zu bytes at %pa\n", fake->size,
		&(phys_addr_t){ virt_to_phys(fake->region) });
	return 0;

free_region:
	free_pages_exact(fake->region, fake->size);
free:
	kfree(fake);
	return err;
}

static void __exit fake_exit(void)
{
	unregister_virtio_device(&fake->vdev);
	free_pages_exact(fake->region, fake->size);
	kfree(fake);
}

module_init(fake_init);
module_exit(fake_exit);
MODULE_DESCRIPTION("TEST ONLY: fake Mirrorball profiler device");
MODULE_LICENSE("Dual MIT/GPL");
