#!/usr/bin/env bash
# run-qemu-test.sh KSRC KBUILD_OUT - TEST ONLY: boot a kernel under QEMU TCG
# (no KVM needed) with the fake profiler device and run mbtest in it.
#
# KSRC:       kernel source tree the kernel was built from (make O=KBUILD_OUT)
# KBUILD_OUT: its build directory, with CONFIG_MIRRORBALL_PROFILER=y or =m
#             (=m: drivers/virt/mirrorball/mirrorball.ko is loaded too) and
#             CONFIG_MODULES=y (the fake device is a module).
#
# microvm (acpi=off) because SeaBIOS on "pc" lists only one CPU in its MP
# table; the kernel has no ACPI. tsc=reliable: TCG vCPUs have unsynchronized
# TSCs, and without a TSC clocksource hrtimers stay at 1/HZ (no 1 kHz);
# tsc_early_khz: see below.
# Needs qemu-system-x86_64, busybox-static, cpio and a static-capable gcc.
# Prints the guest's console; exits 0 if every check passed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
(($# == 2)) || { echo "usage: $0 KSRC KBUILD_OUT" >&2; exit 2; }
KSRC=$(cd "$1" && pwd)
OUT=$(cd "$2" && pwd)
W=$(mktemp -d "${TMPDIR:-/tmp}/mb-qemu.XXXXXX")
trap 'rm -rf -- "$W"' EXIT

# The fake device module, built in a scratch copy.
mkdir -p "$W/mod/test"
cp "$HERE/../mirrorball_abi.h" "$W/mod/"
cp "$HERE/Kbuild" "$HERE/mirrorball_fakedev.c" "$W/mod/test/"
make -s -C "$KSRC" O="$OUT" M="$W/mod/test" W=1 KCFLAGS=-Werror modules >&2

# The initramfs: busybox, /init, mbtest, the modules.
R=$W/root
mkdir -p "$R/bin" "$R/proc" "$R/sys" "$R/dev" "$R/tmp"
cp /bin/busybox "$R/bin/busybox"
cp "$HERE/init" "$R/init"
gcc -O2 -Wall -Wextra -Werror -static -o "$R/mbtest" "$HERE/mbtest.c"
cp "$W/mod/test/mirrorball_fakedev.ko" "$R/"
# The guest tools (work, register, monitor; static Rust binaries) as the
# reference initramfs has them: init runs them against the driver too.
tools=$(bash "$HERE/../../tools/build-static.sh" | tail -n 1)
for t in work register monitor; do
	cp "$tools/$t" "$R/bin/$t"
done
cp "$HERE/../../../resources/initramfs/mirrorball-study" "$R/bin/mirrorball-study"
if grep -qx 'CONFIG_MIRRORBALL_PROFILER=m' "$OUT/.config"; then
	cp "$OUT/drivers/virt/mirrorball/mirrorball.ko" "$R/"
fi
(cd "$R" && find . | cpio -o -H newc --quiet) >"$W/initramfs.cpio"

# The guest prints MBTEST-DONE at the end. microvm resets instead of exiting
# on reboot (even with -no-reboot), so stop QEMU once the marker is there.
# TCG's TSC runs at the host's rate. The kernel calibrates it against the PIT,
# which under TCG fails now and then ("Unable to calibrate against PIT"; no
# HPET or PM timer on microvm), and then marks the TSC unstable: no TSC
# clocksource, no high-res timers, no 1 kHz. So give it the rate.
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
tsc_args="tsc=reliable${khz:+ tsc_early_khz=$khz}"
qemu-system-x86_64 -M microvm,acpi=off -accel tcg -cpu max -smp 2 -m 512 \
	-nographic -no-reboot -kernel "$OUT/arch/x86/boot/bzImage" \
	-initrd "$W/initramfs.cpio" -append "console=ttyS0 panic=-1 loglevel=4 $tsc_args" \
	</dev/null >"$W/console.log" 2>&1 &
qemu=$!
for ((i = 0; i < 600; i++)); do
	grep -qE 'MBTEST-DONE|Kernel panic' "$W/console.log" && break
	kill -0 "$qemu" 2>/dev/null || break
	sleep 1
done
sleep 1
kill "$qemu" 2>/dev/null || true
wait "$qemu" 2>/dev/null || true
cat "$W/console.log"

fail=0
grep -q 'MBTEST-RC=0' "$W/console.log" || fail=1
grep -q 'MBTEST-REATTACH-RC=0' "$W/console.log" || fail=1
grep -q 'MBTEST-DONE' "$W/console.log" || fail=1
for m in TOOLS-WORK-RC=0 TOOLS-REGISTER-LIST-OK TOOLS-MONITOR-RC=0 TOOLS-MONITOR-ROWS-OK \
	STUDY-BAD-RC=2 STUDY-RC=0 STUDY-WORKER-DONE; do
	grep -q "$m" "$W/console.log" || { echo "run-qemu-test: no $m" >&2; fail=1; }
done
grep -qE 'FAIL|BUG:|WARNING:|Oops|Kernel panic|circular locking|sleeping function|INFO: ' \
	"$W/console.log" && fail=1
if ((fail)); then
	echo "run-qemu-test: FAILED" >&2
	exit 1
fi
echo "run-qemu-test: all checks passed" >&2
