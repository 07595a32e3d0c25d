// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The user-space interface: /proc/mirrorball/status (register, unregister,
 * list tasks), /proc/mirrorball/period_ns, and /dev/mirrorball, whose mmap()
 * maps the guest region read-only.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/ctype.h>
#include <linux/fs.h>
#include <linux/kernel.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pid.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/version.h>

#include "mirrorball.h"

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

int mb_proc_create(struct mb_dev *mb)
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

const struct file_operations mb_dev_fops = {
	.owner = THIS_MODULE,
	.mmap = mb_mmap,
	.llseek = noop_llseek,
};
