// SPDX-License-Identifier: Apache-2.0 OR MIT
/*
 * mbtest - user-space test of the Mirrorball guest driver, run inside a guest
 * (see run-qemu-test.sh). Checks /dev/mirrorball (read-only mapping, header),
 * /proc/mirrorball/{status,period_ns} (parsing, errors), and what the driver
 * writes: task-table entries, vCPU slots and ring records, against the
 * kernel's own /proc/<pid>/stat counters.
 *
 *   mbtest          run every check; prints "N passed, M failed"
 *   mbtest head     print the ring head
 *   mbtest after H  check that the ring head is >= H and the tables are fresh
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../mirrorball_abi.h"

static int passed, failed;

static void check(int ok, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("%s: ", ok ? "ok" : "FAIL");
	vprintf(fmt, ap);
	printf("\n");
	va_end(ap);
	if (ok)
		passed++;
	else
		failed++;
	fflush(stdout);
}

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define ACQUIRE() __atomic_thread_fence(__ATOMIC_ACQUIRE)

static const uint8_t *base;
static size_t region_size;
static const struct mb_guest_header *hdr;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void sleep_ms(unsigned int ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static int write_str(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY);
	ssize_t n;
	int err = 0;

	if (fd < 0)
		return -errno;
	n = write(fd, s, strlen(s));
	if (n < 0)
		err = -errno;
	close(fd);
	return err;
}

static int read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -errno;
	buf[n] = 0;
	return n;
}

static int status_cmd(char cmd, int pid)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%c %d\n", cmd, pid);
	return write_str("/proc/mirrorball/status", buf);
}

static int status_lists(int pid)
{
	char buf[4096], *line;
	int p;

	if (read_file("/proc/mirrorball/status", buf, sizeof(buf)) < 0)
		return 0;
	for (line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
		if (sscanf(line, "%d", &p) == 1 && p == pid)
			return 1;
	return 0;
}

/* /proc/<pid>/stat field 10: minflt. */
static long long stat_minflt(int pid)
{
	char path[64], buf[1024], *p;
	long long v = -1;
	int i;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	if (read_file(path, buf, sizeof(buf)) < 0)
		return -1;
	p = strrchr(buf, ')');
	if (!p)
		return -1;
	/* after ") ": state(3) ppid pgrp session tty tpgid flags minflt(10) */
	for (i = 3; i <= 10 && p; i++)
		p = strchr(p + 1, ' ');
	if (p)
		v = atoll(p + 1);
	return v;
}

static int map_region(void)
{
	const struct mb_guest_header *h;
	int fd = open("/dev/mirrorball", O_RDONLY);
	void *p;

	if (fd < 0) {
		check(0, "open /dev/mirrorball: %s", strerror(errno));
		return -1;
	}
	p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		check(0, "mmap header: %s", strerror(errno));
		return -1;
	}
	h = p;
	region_size = LOAD(h->common.region_size);
	munmap(p, 4096);
	p = mmap(NULL, region_size, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED) {
		check(0, "mmap region: %s", strerror(errno));
		return -1;
	}
	base = p;
	hdr = p;
	return 0;
}

static const struct mb_vcpu_slot *slot(uint32_t i)
{
	return (const void *)(base + hdr->vcpus.offset + (uint64_t)i * hdr->vcpus.stride);
}

static const struct mb_task_entry *task(uint32_t i)
{
	return (const void *)(base + hdr->tasks.offset + (uint64_t)i * hdr->tasks.stride);
}

static const struct mb_ring_ctl *ring_ctl(void)
{
	return (const void *)(base + hdr->ring.ctl_offset);
}

static uint64_t ring_head(void)
{
	uint64_t h = LOAD(ring_ctl()->head);

	ACQUIRE();
	return h;
}

/* RingView::read: 0 if record @seq was copied intact. */
static int ring_read(uint64_t seq, struct mb_guest_sample *out)
{
	const struct mb_guest_sample *r = (const void *)(base + hdr->ring.slots_offset +
		(seq % hdr->ring.capacity) * hdr->ring.stride);
	uint64_t a, b;

	a = LOAD(r->seq);
	ACQUIRE();
	if (a != seq)
		return (a & ~MB_SEQ_WRITING) > seq ? -1 : -2;
	out->timestamp_ns = LOAD(r->timestamp_ns);
	out->task_id = LOAD(r->task_id);
	out->pid = LOAD(r->pid);
	out->min_flt = LOAD(r->min_flt);
	out->maj_flt = LOAD(r->maj_flt);
	out->utime_ns = LOAD(r->utime_ns);
	out->stime_ns = LOAD(r->stime_ns);
	out->cpu = LOAD(r->cpu);
	out->flags = LOAD(r->flags);
	ACQUIRE();
	b = LOAD(r->seq);
	return b == seq ? 0 : -3;
}

/* Seqlocked task entry read. */
static int task_read(uint32_t id, struct mb_task_entry *out)
{
	const struct mb_task_entry *e = task(id);
	int tries;

	for (tries = 0; tries < 16; tries++) {
		uint64_t a = LOAD(e->seq), b;

		ACQUIRE();
		if (a & 1)
			continue;
		out->pid = LOAD(e->pid);
		out->tgid = LOAD(e->tgid);
		out->state = LOAD(e->state);
		out->registered_ns = LOAD(e->registered_ns);
		out->unregistered_ns = LOAD(e->unregistered_ns);
		memcpy(out->comm, (const void *)e->comm, sizeof(out->comm));
		ACQUIRE();
		b = LOAD(e->seq);
		if (a == b)
			return 0;
	}
	return -1;
}

static int find_task_id(int pid, uint32_t *id)
{
	struct mb_task_entry e;
	uint32_t i;

	for (i = 0; i < hdr->tasks.capacity; i++)
		if (!task_read(i, &e) && e.state == MB_TASK_REGISTERED &&
		    (int)e.pid == pid) {
			*id = i;
			return 0;
		}
	return -1;
}

/* ---- the child under test ------------------------------------------------- */

/*
 * The guest kernel may lack futexes (tinyconfig), so the child's second
 * thread is a raw clone(CLONE_THREAD) that only makes system calls.
 */
static volatile int phase, worker_done, worker_slot_ok;
static uint32_t child_task_id;
static char worker_stack[1 << 16] __attribute__((aligned(16)));

static void fault_pages(int pages)
{
	char *p = mmap(NULL, pages * 4096L, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int i;

	if (p == MAP_FAILED)
		return;
	for (i = 0; i < pages; i++)
		p[i * 4096L] = 1;
	munmap(p, pages * 4096L);
}

/*
 * While this thread runs, the slot of its CPU must name it: its thread id,
 * its process, and the process's task id.
 */
static int own_slot_ok(void)
{
	int tries;

	for (tries = 0; tries < 100; tries++) {
		unsigned int cpu, cpu2;
		const struct mb_vcpu_slot *s;
		uint64_t a, b;
		uint32_t id, pid, tgid;

		if (syscall(SYS_getcpu, &cpu, NULL, NULL) || cpu >= hdr->vcpus.capacity)
			return 0;
		s = slot(cpu);
		a = LOAD(s->seq);
		ACQUIRE();
		id = LOAD(s->task_id);
		pid = LOAD(s->pid);
		tgid = LOAD(s->tgid);
		ACQUIRE();
		b = LOAD(s->seq);
		if (syscall(SYS_getcpu, &cpu2, NULL, NULL) || cpu2 != cpu || a != b || (a & 1))
			continue;	/* migrated or preempted: again */
		return id == child_task_id && pid == (uint32_t)syscall(SYS_gettid) &&
		       tgid == (uint32_t)getpid();
	}
	return 0;
}

static int worker(void *arg)
{
	int i;

	(void)arg;
	worker_slot_ok = own_slot_ok();
	for (i = 0; i < 40; i++) {
		fault_pages(64);
		sleep_ms(5);
	}
	worker_done = 1;
	syscall(SYS_exit, 0);	/* this thread only */
	return 0;
}

static void on_usr1(int sig)
{
	phase = sig;
}

/*
 * Reports 'r' (started), gets its task id, checks its own slot ('S'/'s'),
 * faults in two threads ('W'/'w': the worker's slot check), reports 'd' and
 * idles until SIGUSR1, then exits.
 */
static void child_main(int wpipe, int rpipe)
{
	char c;
	int i;

	signal(SIGUSR1, on_usr1);
	if (write(wpipe, "r", 1) != 1 ||
	    read(rpipe, &child_task_id, sizeof(child_task_id)) != sizeof(child_task_id))
		_exit(2);
	c = own_slot_ok() ? 'S' : 's';
	if (write(wpipe, &c, 1) != 1)
		_exit(2);
	if (clone(worker, worker_stack + sizeof(worker_stack),
		  CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD |
		  CLONE_SYSVSEM, NULL) < 0)
		_exit(3);
	for (i = 0; i < 40; i++) {
		fault_pages(64);
		sleep_ms(5);
	}
	while (!worker_done)
		sleep_ms(5);
	c = worker_slot_ok ? 'W' : 'w';
	if (write(wpipe, &c, 1) != 1 || write(wpipe, "d", 1) != 1)
		_exit(2);
	while (!phase)
		pause();
	_exit(0);
}

/* ---- checks ----------------------------------------------------------------- */

static void check_mmap_rules(void)
{
	int fd = open("/dev/mirrorball", O_RDWR);
	void *p;

	if (fd < 0) {
		check(0, "open /dev/mirrorball O_RDWR: %s", strerror(errno));
		return;
	}
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	check(p == MAP_FAILED && errno == EPERM, "writable shared mmap refused (EPERM)");
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	check(p == MAP_FAILED && errno == EPERM, "writable private mmap refused (EPERM)");
	p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
	check(p != MAP_FAILED, "read-only mmap allowed");
	if (p != MAP_FAILED) {
		check(mprotect(p, 4096, PROT_READ | PROT_WRITE) != 0,
		      "mprotect to writable refused");
		munmap(p, 4096);
	}
	p = mmap(NULL, region_size + 4096, PROT_READ, MAP_SHARED, fd, 0);
	check(p == MAP_FAILED, "mapping past the region refused");
	p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, region_size);
	check(p == MAP_FAILED, "offset past the region refused");
	close(fd);
}

static void check_header(void)
{
	check(LOAD(hdr->common.magic) == MB_GUEST_MAGIC, "magic");
	check(LOAD(hdr->common.version_major) == 1, "version 1.x");
	check(LOAD(hdr->guest_boot_id) != 0, "guest_boot_id set (%#llx)",
	      (unsigned long long)LOAD(hdr->guest_boot_id));
	check(LOAD(hdr->common.sample_period_ns) >= 1000000,
	      "sample_period_ns published (%llu)",
	      (unsigned long long)LOAD(hdr->common.sample_period_ns));
	check(ring_head() >= 1, "ring head >= 1");
}

static void check_proc_parsing(void)
{
	char buf[128];
	int err;

	check(status_cmd('R', 999999) == -ESRCH, "R of a missing pid: ESRCH");
	check(write_str("/proc/mirrorball/status", "X 1\n") == -EINVAL, "unknown command: EINVAL");
	check(write_str("/proc/mirrorball/status", "R\n") == -EINVAL, "missing pid: EINVAL");
	check(write_str("/proc/mirrorball/status", "R abc\n") == -EINVAL, "bad pid: EINVAL");
	check(write_str("/proc/mirrorball/status", "R -5\n") == -EINVAL, "negative pid: EINVAL");
	memset(buf, '1', sizeof(buf) - 1);
	buf[0] = 'R';
	buf[1] = ' ';
	buf[sizeof(buf) - 1] = 0;
	check(write_str("/proc/mirrorball/status", buf) == -EINVAL, "overlong write: EINVAL");
	check(status_cmd('U', 999999) == -ENOENT, "U of an unregistered pid: ENOENT");
	check(write_str("/proc/mirrorball/period_ns", "999999\n") == -EINVAL, "period below 1 ms: EINVAL");
	check(write_str("/proc/mirrorball/period_ns", "61000000000\n") == -EINVAL, "period above 60 s: EINVAL");
	check(write_str("/proc/mirrorball/period_ns", "fast\n") == -EINVAL, "period not a number: EINVAL");
	err = write_str("/proc/mirrorball/period_ns", "1000000\n");
	check(err == 0, "period 1 ms accepted (%d)", err);
	check(read_file("/proc/mirrorball/period_ns", buf, sizeof(buf)) > 0 &&
	      strtoull(buf, NULL, 10) == 1000000, "period reads back 1000000");
	check(LOAD(hdr->common.sample_period_ns) == 1000000, "header sample_period_ns = 1 ms");
}

static void check_unregister(void)
{
	uint32_t id;
	struct mb_task_entry e;
	pid_t pid = fork();

	if (pid == 0) {
		pause();
		_exit(0);
	}
	check(status_cmd('R', pid) == 0, "R sleeper");
	check(status_cmd('R', pid) == -EEXIST, "R twice: EEXIST");
	check(status_lists(pid), "status lists the sleeper");
	check(find_task_id(pid, &id) == 0, "sleeper in the task table");
	check(status_cmd('U', pid) == 0, "U sleeper");
	check(!status_lists(pid), "status no longer lists the sleeper");
	check(!task_read(id, &e) && e.state == MB_TASK_UNREGISTERED && (int)e.pid == pid &&
	      e.unregistered_ns >= e.registered_ns,
	      "task entry unregistered, pid kept");
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
}

/* Registers a faulting two-thread child and follows it through the ring. */
static void check_sampling(void)
{
	struct mb_guest_sample r, last = { 0 };
	struct mb_task_entry e;
	uint64_t next, records = 0, lost = 0, mine = 0;
	uint64_t bad = 0, exited_seen = 0, deadline;
	long long stat_flt = -1;
	int up[2], down[2], idle_checked = 0, slot_ok = 0, worker_ok = 0;
	uint32_t id = MB_TASK_NONE;
	char c;
	pid_t pid;

	if (pipe(up) || pipe(down))
		return;
	pid = fork();
	if (pid == 0) {
		close(up[0]);
		close(down[1]);
		child_main(up[1], down[0]);
	}
	close(up[1]);
	close(down[0]);
	if (read(up[0], &c, 1) != 1)
		return;
	next = ring_head();
	check(status_cmd('R', pid) == 0, "R faulting child %d", pid);
	find_task_id(pid, &id);
	check(id != MB_TASK_NONE, "child in the task table (id %u)", id);
	check(!task_read(id, &e) && e.tgid == (uint32_t)pid && e.registered_ns > 0 &&
	      e.unregistered_ns == 0, "task entry fields");
	if (write(down[1], &id, sizeof(id)) != sizeof(id))
		return;
	fcntl(up[0], F_SETFL, O_NONBLOCK);

	deadline = now_ns() + 20000000000ull;
	while (now_ns() < deadline) {
		uint64_t head = ring_head();

		if (head > next + hdr->ring.capacity) {
			lost += head - hdr->ring.capacity - next;
			next = head - hdr->ring.capacity;
		}
		for (; next < head; next++) {
			if (ring_read(next, &r)) {
				lost++;
				continue;
			}
			records++;
			if (r.task_id != id)
				continue;
			mine++;
			if ((int)r.pid != pid)
				bad++;
			if (r.min_flt < last.min_flt || r.maj_flt < last.maj_flt ||
			    r.utime_ns < last.utime_ns || r.stime_ns < last.stime_ns ||
			    r.timestamp_ns < last.timestamp_ns)
				bad++;
			last = r;
			if (r.flags & MB_SAMPLE_EXITED)
				exited_seen++;
		}
		if (exited_seen)
			break;
		while (read(up[0], &c, 1) == 1) {
			if (c == 'S')
				slot_ok = 1;
			if (c == 'W')
				worker_ok = 1;
			if (c != 'd' || idle_checked)
				continue;
			/* The child finished faulting and idles: counters must match. */
			sleep_ms(30);
			stat_flt = stat_minflt(pid);
			sleep_ms(30);
			head = ring_head();
			for (; next < head; next++)
				if (!ring_read(next, &r)) {
					records++;
					if (r.task_id == id) {
						last = r;
						mine++;
					}
				} else {
					lost++;
				}
			check(stat_flt > 0 && (long long)last.min_flt == stat_flt,
			      "idle child: ring min_flt %llu == /proc stat minflt %lld (both threads)",
			      (unsigned long long)last.min_flt, stat_flt);
			check(last.min_flt > 2 * 40 * 64, "min_flt covers both threads' faults");
			check(last.utime_ns + last.stime_ns > 0, "CPU time %llu+%llu ns",
			      (unsigned long long)last.utime_ns,
			      (unsigned long long)last.stime_ns);
			idle_checked = 1;
			kill(pid, SIGUSR1);
			waitpid(pid, NULL, 0);
		}
		usleep(500);
	}
	check(slot_ok, "the child's vCPU slot named it (task id, pid, tgid)");
	check(worker_ok, "the second thread's slot named it and the process's task id");
	check(idle_checked, "child reached its idle phase");
	check(mine > 100, "%llu samples of the child at 1 kHz (%llu records in all)",
	      (unsigned long long)mine, (unsigned long long)records);
	check(lost == 0, "no record lost or torn (%llu)", (unsigned long long)lost);
	check(bad == 0, "counters absolute and monotonic, pid right");
	check(exited_seen == 1, "exactly one EXITED record (%llu)", (unsigned long long)exited_seen);
	check(stat_flt > 0 && last.min_flt >= (uint64_t)stat_flt, "final min_flt %llu >= last seen %lld",
	      (unsigned long long)last.min_flt, stat_flt);
	sleep_ms(20);
	check(!status_lists(pid), "exited child unregistered by the sampler");
	check(!task_read(id, &e) && e.state == MB_TASK_UNREGISTERED, "its entry is unregistered");
	close(up[0]);
	close(down[1]);
}

static void check_slots(void)
{
	uint32_t i, idle = 0, sane = 1;

	for (i = 0; i < hdr->vcpus.capacity; i++) {
		const struct mb_vcpu_slot *s = slot(i);
		uint64_t seq = LOAD(s->seq);
		int tries;

		/* Odd only while its CPU is switching: look again. */
		for (tries = 0; (seq & 1) && tries < 1000; tries++)
			seq = LOAD(s->seq);

		if (LOAD(s->flags) & MB_VCPU_IDLE)
			idle++;
		if (i < (uint32_t)sysconf(_SC_NPROCESSORS_ONLN) &&
		    (LOAD(s->switch_count) == 0 || (seq & 1)))
			sane = 0;
	}
	check(sane, "every online vCPU slot has switches and an even seq");
	check(1, "%u slots show the idle task now", idle);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (map_region())
		return 1;
	if (argc == 2 && !strcmp(argv[1], "head")) {
		printf("%llu\n", (unsigned long long)ring_head());
		return 0;
	}
	if (argc == 3 && !strcmp(argv[1], "after")) {
		uint64_t before = strtoull(argv[2], NULL, 10);
		struct mb_task_entry e;
		uint32_t i, fresh = 1;

		check(ring_head() >= before, "ring continues after reattach (%llu >= %llu)",
		      (unsigned long long)ring_head(), (unsigned long long)before);
		for (i = 0; i < hdr->tasks.capacity; i++)
			if (task_read(i, &e) || e.state != MB_TASK_FREE)
				fresh = 0;
		check(fresh, "task table cleared at attach");
		printf("%d passed, %d failed\n", passed, failed);
		return failed != 0;
	}
	check_header();
	check_mmap_rules();
	check_slots();
	check_proc_parsing();
	check_unregister();
	check_sampling();
	printf("%d passed, %d failed\n", passed, failed);
	return failed != 0;
}
