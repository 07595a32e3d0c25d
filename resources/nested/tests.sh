# tests.sh - the tests the nested test bed runs inside L1 (sourced by /init).
# Each test_NAME runs in /results/NAME (its files come back to the host in
# files/NAME/), prints what it saw and returns 0 when its own checks pass;
# tests/nested_svm.rs asserts on the files in detail. LIMIT_NAME (seconds,
# default 240) bounds a test: /init kills a test that runs longer (with every
# process it started), prints where they were stuck and runs it once more. Keep L2 consoles quiet
# (`quiet`): every console byte is a VM exit.

G=/guest
# MIRRORBALL_NESTED_VERBOSE=1 (run.sh) shows the L2 kernels' messages.
CMD="console=ttyS0 reboot=k panic=1 $([ -n "${MB_VERBOSE:-}" ] && echo loglevel=7 || echo quiet)"

# now: seconds of uptime (for durations inside L1).
now() { cut -d' ' -f1 /proc/uptime; }
# since T0: seconds since T0, one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# linux NAME VMM-ARGS...: boot a Linux guest, console in NAME.console, rc in
# NAME.rc, vmm's stderr in NAME.err, the time to the user-space marker in
# NAME.secs (whole vmm run if none).
linux() {
	name=$1
	shift
	t0=$(now)
	vmm "$@" </dev/null >"$name.console" 2>"$name.err"
	echo $? >"$name.rc"
	since "$t0" >"$name.secs"
	echo "$name: rc=$(cat "$name.rc") in $(cat "$name.secs") s; $(tail -n1 "$name.err")"
}

# 1. The OS-less workload (the README's main job) on a non-PVM KVM (about 4 s).
test_osless() {
	vmm --stats stats.json --timeout 60 </dev/null >out.txt 2>err.txt
	rc=$?
	cat out.txt err.txt
	[ $rc = 0 ] && grep -q 'host KVM: amd' out.txt
}
LIMIT_osless=90

# 2. The reference kernel to user space, 1 and 2 vCPUs, ending by reboot.
test_linux1() {
	linux boot --kernel $G/bzImage --initrd $G/initramfs.cpio --vcpus 1 --cmdline "$CMD" \
		--stats stats.json --timeout 60
	grep -q MIRRORBALL-INIT-OK boot.console && tr -d '\r' <boot.console | grep -q 'mirrorball: cpus 1$' &&
		[ "$(cat boot.rc)" = 0 ]
}
test_linux2() {
	linux boot --kernel $G/bzImage --initrd $G/initramfs.cpio --vcpus 2 --cmdline "$CMD" \
		--stats stats.json --timeout 60
	grep -q MIRRORBALL-INIT-OK boot.console && tr -d '\r' <boot.console | grep -q 'mirrorball: cpus 2$' &&
		[ "$(cat boot.rc)" = 0 ]
}

# 2a. Two Linux clones of one template in one vmm (issue 7), each to user space.
test_fleet() {
	for attempt in 1 2; do
		rm -rf logs
		vmm --vms 2 --kernel $G/bzImage --initrd $G/initramfs.cpio --cmdline "$CMD" --log-dir logs \
			--stats stats.json --timeout 90 </dev/null >out.txt 2>err.txt
		rc=$?
		cat err.txt
		[ $rc = 0 ] && grep -q MIRRORBALL-INIT-OK logs/vm0.log && grep -q MIRRORBALL-INIT-OK logs/vm1.log &&
			return 0
		# Seen once in CI (not reproduced in 10 runs here): one of the two L2 kernels hung early
		# in boot under L1's emulated SVM. The first attempt's files stay in attempt1/ and
		# the Rust test prints them; a second failure fails the test.
		for f in logs/*.log; do echo "--- $f (last lines)"; tail -n 20 "$f"; done
		[ $attempt = 1 ] && mkdir -p attempt1 && cp -a logs err.txt stats.json attempt1/ 2>/dev/null
	done
	return 1
}

LIMIT_fleet=260

# 2b. A guest that powers off (no ACPI: Linux halts its CPUs with interrupts
# off) ends the VM with exit code 0.
test_poweroff() {
	linux off --kernel $G/bzImage --initrd $G/poweroff.cpio --vcpus 2 --cmdline "$CMD" \
		--stats stats.json --timeout 60
	grep -q MIRRORBALL-POWEROFF off.console && [ "$(cat off.rc)" = 0 ] && grep -q 'guest halted' off.err
}

# 3. The guest driver's user-space checks against the VMM's profiler device.
# One check counts the samples of a child at 1 kHz over its life; when the
# machine under L1 is overloaded the L2 sampler misses periods and it fails, so
# a failed run is tried once more (the first attempt stays in mbtest.1.console).
test_mbtest() {
	for attempt in 1 2; do
		linux mbtest --kernel $G/bzImage --initrd $G/mbtest.cpio --vcpus 2 --mem 256M \
			--cmdline "console=ttyS0 reboot=k panic=1 loglevel=4" --timeout 120
		cat mbtest.console
		grep -q 'MBTEST-RC=0' mbtest.console && grep -q 'MBTEST-DONE' mbtest.console && return 0
		[ $attempt = 1 ] && cp mbtest.console mbtest.1.console
	done
	return 1
}

LIMIT_mbtest=300

# study NAME MEM SCALE [EXTRA [VMM-ARG...]]: an MP3 case study (sizes divided by
# SCALE, mbscale=) with `vmm record` beside it; EXTRA goes on the guest command
# line, the VMM-ARGs to vmm.
study() {
	study=$1 mem=$2 scale=$3 extra=${4:-}
	shift 3
	[ $# -gt 0 ] && shift
	vmm --kernel $G/bzImage --initrd $G/study.cpio --vcpus 2 --mem "$mem" --timeout 180 "$@" </dev/null \
		--cmdline "$CMD mirrorball.study=$study mbscale=$scale${extra:+ $extra}" >study.console 2>study.err &
	vm=$!
	vmm record --wait 20 -o record.csv 2>record.err
	echo $? >record.rc
	wait $vm
	echo $? >study.rc
	cat study.console study.err record.err
	grep -q "MIRRORBALL-STUDY-DONE $study rc=0" study.console && [ "$(cat study.rc)" = 0 ] &&
		[ "$(cat record.rc)" = 0 ]
}

# 4. MP3 case study 1 (two workers, random/random; 16 MiB each) and 2 (3 copies
# of 6 MiB), recorded.
test_study1() { study mp3-1a 256M 64; }
test_study2() { study mp3-2:3 256M 32; }

# 5. A stock Debian cloud kernel (the L1 kernel itself) to user space.
test_stock() {
	linux stock --kernel $G/stock-vmlinuz --initrd $G/stock.cpio --mem 256M \
		--cmdline "$CMD" --stats stats.json --timeout 60
	grep -q MIRRORBALL-INIT-OK stock.console && [ "$(cat stock.rc)" = 0 ]
}

# 6. `vmm top` on a running Linux guest, in a pseudo-terminal (ptyrun).
test_top() {
	vmm --kernel $G/bzImage --initrd $G/study.cpio --vcpus 2 --mem 256M --timeout 180 </dev/null \
		--cmdline "$CMD mirrorball.study=mp3-2:2 mbscale=4" >study.console 2>study.err &
	vm=$!
	# Until the guest's workers are registered (their task rows exist).
	i=0
	while [ $i -lt 60 ] && ! grep -q 'mirrorball: cpus' study.console; do
		sleep 0.5
		i=$((i + 1))
	done
	sleep 2
	# 12 s: a loaded host makes L1 slow enough that a debug `vmm top` drew nothing in 4 s once.
	ptyrun 160 50 12 vmm top --interval 500 >top.raw 2>top.err
	echo $? >top.rc
	# Seen enough: stop the guest (exit code 130).
	kill $vm
	wait $vm
	echo $? >study.rc
	# tests/nested_svm.rs reads the screen (top.raw) without its escape sequences.
	# 124: ptyrun had to kill it (it may not quit within 3 s of the "q" in a slow L1).
	grep -q work top.raw && { [ "$(cat top.rc)" = 0 ] || [ "$(cat top.rc)" = 124 ]; }
}

# 7. The machine-memory budget on cgroup v2 (our machines have v1): the OS-less
# guest under pressure (64 MiB touched, 80 MiB budget for the whole process)
# with zram as L1's swap; the same run without a budget gives the reference
# result. leftovers.txt: budget cgroups still there after the run.
test_budget2() {
	grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup || return 1
	if ! grep -q zram0 /proc/swaps; then
		echo 512M >/sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null && swapon /dev/zram0 ||
			return 1
	fi
	cat /proc/swaps
	vmm --workload "work 64 R 300000" --stats free.json --timeout 120 </dev/null >free.txt 2>&1
	echo "free: rc=$?"
	vmm --workload "work 64 R 300000" --machine-mem 80M --stats capped.json --timeout 120 \
		</dev/null >out.txt 2>err.txt
	rc=$?
	ls -d /sys/fs/cgroup/mirrorball-* >leftovers.txt 2>/dev/null
	cat out.txt err.txt leftovers.txt
	swapoff /dev/zram0
	[ $rc = 0 ] && [ ! -s leftovers.txt ]
}

# 8. An MP3 case study whose L2 guest swaps to the copy-on-write disk: case study 1
# (sizes / 24: two 42 MiB workers, about 65 MiB touched) in a 72 MiB guest whose
# swap is /dev/vda, the VMM's virtio-blk disk over a sparse 256 MiB base with an
# overlay file (`mbswap=` makes the guest's study runner mkswap/swapon it). Passes
# when the study finished, the guest both swapped out and in, and the workers took
# major faults; the disk's counters are in stats.json. (At sizes / 32, 47 MiB
# touched, a CI run swapped 5 MiB out and the workers took no major fault.)
test_swapstudy() {
	for attempt in 1 2; do
		truncate -s 256M swap.img
		rm -f swap.overlay
		study mp3-1a 72M 24 mbswap=/dev/vda --disk swap.img,overlay=swap.overlay --stats stats.json
		rc=$?
		# Sparse 256 MiB each: not worth sending back.
		rm -f swap.img swap.overlay
		[ $rc = 0 ] && grep -q "mirrorball-study: swap on /dev/vda" study.console &&
			awk '/mirrorball-study: swap read/ { ok = $4 > 0 && $7 > 0 } END { exit !ok }' study.console &&
			tr ' ' '\n' <study.console | awk -F= '$1 == "maj_flt" { m += $2 } END { exit !(m > 0) }' &&
			return 0
		# Once in CI the guest (then 64 MiB) reset itself mid-study under swap pressure (a
		# panic, likely the OOM killer reaching init): the first attempt stays in attempt1/.
		[ $attempt = 1 ] && mkdir -p attempt1 && cp study.console study.err stats.json attempt1/ 2>/dev/null
	done
	return 1
}
LIMIT_swapstudy=360

# 9. A Linux template snapshotted at a late boot message and restored as two
# clones (issue 11): each clone boots on from the snapshot to user space; so
# does a lazily restored one (--lazy).
# loglevel=7 instead of quiet: the trigger line is a KERN_INFO message.
test_snapshot() {
	rm -rf snap logs
	linux template --kernel $G/bzImage --initrd $G/initramfs.cpio --vcpus 1 \
		--cmdline "console=ttyS0 reboot=k panic=1 loglevel=7" \
		--snapshot-on "Write protecting the kernel read-only data" "$PWD/snap" --timeout 90
	grep -q 'snapshot in' template.err && grep -q MIRRORBALL-INIT-OK template.console &&
		[ "$(cat template.rc)" = 0 ] || return 1
	t0=$(now)
	vmm --restore "$PWD/snap" --vms 2 --log-dir logs --stats stats.json --timeout 90 \
		</dev/null >restore.out 2>restore.err
	rc=$?
	since "$t0" >restore.secs
	echo "restore: rc=$rc in $(cat restore.secs) s"
	cat restore.err
	[ $rc = 0 ] || { rm -f snap/memory.bin; return 1; }
	for vm in vm0 vm1; do
		grep -q MIRRORBALL-INIT-OK logs/$vm.log || { rm -f snap/memory.bin; return 1; }
		# A clone starts after the snapshot's line: nothing of the boot before it.
		grep -q 'Linux version' logs/$vm.log && { rm -f snap/memory.bin; return 1; }
	done
	# A lazy clone (--lazy): its memory loaded from the snapshot on first touch.
	vmm --restore "$PWD/snap" --lazy --stats lazy.json --timeout 90 \
		</dev/null >lazy.console 2>lazy.err
	rc=$?
	echo "lazy restore: rc=$rc"
	cat lazy.err
	# The snapshot's memory file: not worth sending back.
	rm -f snap/memory.bin
	[ $rc = 0 ] && grep -q MIRRORBALL-INIT-OK lazy.console && ! grep -q 'Linux version' lazy.console
}
LIMIT_snapshot=260

# 10. A Linux template with a copy-on-write disk (an empty 16 MiB ext2 base,
# made here; its overlay a file) writes a file on the disk from user space, is
# snapshotted at its console marker and restored as two clones (issue 11 with
# the disk): each clone reads the template's file, writes one of its own and
# must not see the other's (l2-snapdisk-init). Then a restore after the base
# image changed (touch) is refused: exit code 22, one line.
test_snapdisk() {
	rm -rf snap logs base.ext2 template.ov
	truncate -s 16M base.ext2 && mke2fs -F base.ext2 >/dev/null || return 1
	linux template --kernel $G/bzImage --initrd $G/snapdisk.cpio --vcpus 1 --cmdline "$CMD" \
		--disk base.ext2,overlay=template.ov --snapshot-on MIRRORBALL-SNAPDISK-READY "$PWD/snap" \
		--timeout 120
	cat template.console
	grep -q 'snapshot in' template.err && grep -q MIRRORBALL-SNAPDISK-DONE template.console &&
		[ "$(cat template.rc)" = 0 ] || return 1
	rm -f template.ov
	t0=$(now)
	vmm --restore "$PWD/snap" --vms 2 --log-dir logs --stats stats.json --timeout 120 \
		</dev/null >restore.out 2>restore.err
	rc=$?
	since "$t0" >restore.secs
	echo "restore: rc=$rc in $(cat restore.secs) s"
	cat restore.err logs/*.log
	touch base.ext2
	vmm --restore "$PWD/snap" </dev/null >changed.out 2>changed.err
	echo $? >changed.rc
	cat changed.err
	# The memory file and the base: not worth sending back.
	rm -f snap/memory.bin base.ext2
	[ $rc = 0 ] && [ "$(cat changed.rc)" = 22 ] && [ "$(wc -l <changed.err)" = 1 ] || return 1
	for vm in vm0 vm1; do
		grep -q "snapdisk: mirrorball-$vm reads template.txt: written by the template" logs/$vm.log &&
			grep -q MIRRORBALL-SNAPDISK-DONE logs/$vm.log || return 1
		# A clone starts after the snapshot's line: nothing of the boot before it.
		grep -q 'MIRRORBALL-SNAPDISK-READY' logs/$vm.log && return 1
	done
	grep 'snapdisk: mirrorball-vm0 sees:' logs/vm0.log | grep -q 'mirrorball-vm0.txt' &&
		grep 'snapdisk: mirrorball-vm1 sees:' logs/vm1.log | grep -q 'mirrorball-vm1.txt' || return 1
	! grep -q 'mirrorball-vm1.txt' logs/vm0.log && ! grep -q 'mirrorball-vm0.txt' logs/vm1.log
}
LIMIT_snapdisk=240

# Benchmarks (not in the default list: `run.sh bench`). Ratios of medians
# measured in this one run, interleaved on/off; bench.md is the table.
# median: the median of the numbers on stdin.
median() { sort -n | awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)] }'; }
LIMIT_bench=1800
test_bench() {
	for i in 1 2; do
		for hz in 20 0; do
			t0=$(now)
			vmm --kernel $G/bzImage --initrd $G/initramfs.cpio --cmdline "$CMD" --sample-hz $hz \
				--timeout 120 </dev/null >boot.console 2>&1
			grep -q MIRRORBALL-INIT-OK boot.console && echo "boot $hz $(since "$t0")" >>bench.raw
		done
	done
	for i in 1 2; do
		for hz in 20 0; do
			t0=$(now)
			# Without the profiler there is no device to register with.
			reg=1
			[ $hz = 0 ] && reg=0
			vmm --kernel $G/bzImage --initrd $G/study.cpio --vcpus 2 --mem 256M --sample-hz $hz \
				--timeout 300 --cmdline "$CMD mirrorball.study=mp3-1a mbscale=64 mbregister=$reg" \
				</dev/null >study.console 2>&1
			grep -q 'STUDY-DONE mp3-1a rc=0' study.console && echo "study1 $hz $(since "$t0")" >>bench.raw
		done
	done
	{
		echo "| benchmark (inside L1) | profiler on (20 Hz) | off | ratio |"
		echo "|---|---:|---:|---:|"
		for what in boot study1; do
			on=$(awk -v w=$what '$1 == w && $2 == 20 { print $3 }' bench.raw | median)
			off=$(awk -v w=$what '$1 == w && $2 == 0 { print $3 }' bench.raw | median)
			ratio=$(awk -v a="$on" -v b="$off" 'BEGIN { if (b > 0) printf "%.2f", a / b }')
			echo "| $what | $on s | $off s | ${ratio}x |"
		done
	} >bench.md
	if [ -x /bin/vmm_bench ]; then
		timeout 300 vmm_bench --vmm /bin/vmm exits >exits.md 2>exits.err
		echo "vmm_bench rc=$?" >>exits.err
	fi
	cat bench.raw bench.md exits.md exits.err 2>/dev/null
	[ -s bench.md ]
}
