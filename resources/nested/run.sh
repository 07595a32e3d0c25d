#!/usr/bin/env bash
# run.sh - Mirrorball's nested-SVM test bed: boot a Debian cloud kernel under
# QEMU TCG with emulated AMD SVM + nested paging (a real kvm_amd, unlike the
# PVM /dev/kvm of our machines), run `vmm` tests inside it (L1) and bring their
# results back.
#
#   resources/nested/run.sh [--out DIR] [--vmm PATH] [--timeout SECS] [TEST...]
#   resources/nested/run.sh --prepare   # only check and fetch the L1 kernel
#
# TEST: names from tests.sh (default: all of them, in its order). Results go to
# DIR (default: a new directory under ${TMPDIR:-/tmp}); its layout:
#   console.log        the L1 console (markers NESTED-BEGIN/NESTED-END per test);
#                      every boot's, in order, when L1 had to boot again
#   results.txt        one line per test: NAME rc=N secs=S
#   files/NAME/...     what each test wrote inside L1 (logs, CSVs, stats JSON)
#   timings.txt        test bed phases (prepare, boot, tests) in seconds
#   bootN.*            each L1 boot's console and files stream
# A test that hangs is killed inside L1 at its limit and runs once more (see
# l1-init). When L1 itself panics or freezes (nothing on its console for
# $MIRRORBALL_NESTED_SILENT_LIMIT s, default 120), the tests without a result
# run in a new L1, the one it stopped in once more (at most 3 boots); a test
# that stops L1 twice gets rc=125.
# The last line of stdout is DIR. Exit: 0 when every selected test reported
# rc=0, 1 when one did not, 2 for usage, 3 when the test bed cannot run
# (missing QEMU, packages, space; one line on stderr says which).
#
# Inputs (all from Debian packages or this repository):
#   - linux-image-*-cloud-amd64 (apt-get download + dpkg-deb -x, never
#     installed): L1 kernel, its kvm, kvm-amd, irqbypass modules (and zram's,
#     for swap in L1); also the
#     "stock kernel" L2 guest;
#   - busybox-static, gcc (static mbtest), cpio;
#   - vmm (--vmm, $MIRRORBALL_VMM, else `cargo build -p vmm`) and the shared
#     libraries it links; the reference guest (resources/build-guest.sh, or
#     $MIRRORBALL_KERNEL / $MIRRORBALL_INITRD).
# Cache: ${MIRRORBALL_CACHE_DIR:-$HOME/.cache/mirrorball}/nested, keyed by
# content (kernel/<deb sha>, l1/<hash of every input>); see README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORKSPACE=$(cd "$HERE/../.." && pwd)
CACHE="${MIRRORBALL_CACHE_DIR:-$HOME/.cache/mirrorball}/nested"
KPKG=linux-image-cloud-amd64
# L1's modules, in load order: KVM on AMD; zram (swap in RAM) for the budget test.
MODULES=(irqbypass kvm kvm-amd zsmalloc lzo-rle zram)
L1_MEM=${MIRRORBALL_NESTED_MEM:-2048}
MIN_FREE_MB=1024

log() { printf 'nested: %s\n' "$*" >&2; }
fail_setup() { printf 'nested: cannot run the test bed: %s\n' "$*" >&2; exit 3; }
usage() { sed -n '4,6p' "$0" | sed 's/^# //' >&2; exit 2; }

OUT= VMM=${MIRRORBALL_VMM:-} TIMEOUT=900 TESTS=() PREPARE=0
while (($#)); do
  case $1 in
    --out) OUT=${2:?}; shift 2 ;;
    --vmm) VMM=${2:?}; shift 2 ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --prepare) PREPARE=1; shift ;;
    -h | --help) usage ;;
    -*) log "unknown option $1"; usage ;;
    *) TESTS+=("$1"); shift ;;
  esac
done
mapfile -t ALL_TESTS < <(sed -n 's/^test_\([a-z0-9_]*\)() .*/\1/p' "$HERE/tests.sh")
# The default: every test but the benchmarks.
((${#TESTS[@]})) || for t in "${ALL_TESTS[@]}"; do [[ $t == bench ]] || TESTS+=("$t"); done
for t in "${TESTS[@]}"; do
  [[ " ${ALL_TESTS[*]} " == *" $t "* ]] || { log "unknown test '$t' (tests: ${ALL_TESTS[*]})"; exit 2; }
done

T0=$SECONDS
# --- prerequisites ----------------------------------------------------------
command -v qemu-system-x86_64 >/dev/null ||
  fail_setup "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
for c in apt-get apt-cache dpkg-deb cpio gcc sha256sum ldd; do
  command -v "$c" >/dev/null || fail_setup "$c not found (needs a Debian host with apt, dpkg, cpio, gcc)"
done
[[ -x /bin/busybox ]] && ! readelf -l /bin/busybox 2>/dev/null | grep -q INTERP ||
  fail_setup "/bin/busybox missing or not static (apt-get install busybox-static)"
mkdir -p "$CACHE/tmp" || fail_setup "cannot create $CACHE"
free_mb=$(df -Pm "$CACHE" | awk 'NR == 2 { print $4 }')
((free_mb >= MIN_FREE_MB)) || fail_setup "only ${free_mb} MB free under $CACHE (needs $MIN_FREE_MB MB)"

exec 9>"$CACHE/.lock"
flock 9

hash16() { sha256sum | cut -c1-16; }

# --- L1 kernel: Debian's cloud kernel, extracted, never installed -----------
# The metapackage names the current ABI package; apt-cache is local (no network).
KDEB_PKG=$(apt-cache depends "$KPKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[[ -n $KDEB_PKG ]] || fail_setup "apt-cache knows no $KPKG (run apt-get update)"
KDEB_VER=$(apt-cache policy "$KDEB_PKG" | awk '/Candidate:/ { print $2 }')
deb=$(ls "$CACHE/debs/${KDEB_PKG}_${KDEB_VER//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
if [[ -z $deb ]]; then
  log "downloading $KDEB_PKG $KDEB_VER (apt-get download)"
  mkdir -p "$CACHE/debs"
  (cd "$CACHE/tmp" && apt-get download -qq "$KDEB_PKG" >&2 2>&1) ||
    fail_setup "apt-get download $KDEB_PKG failed (network? apt-get update?)"
  mv "$CACHE/tmp/${KDEB_PKG}_"*.deb "$CACHE/debs/"
  deb=$(ls "$CACHE/debs/${KDEB_PKG}_"*.deb | head -n1)
fi
KKEY=$({ cat "$deb"; echo "${MODULES[*]}"; } | hash16)
KDIR=$CACHE/kernel/$KKEY
if [[ ! -f $KDIR/vmlinuz ]]; then
  log "extracting $(basename "$deb")"
  x=$(mktemp -d "$CACHE/tmp/kernel.XXXXXX")
  dpkg-deb -x "$deb" "$x/root"
  mkdir -p "$x/out"
  cp "$x"/root/boot/vmlinuz-* "$x/out/vmlinuz"
  for m in "${MODULES[@]}"; do
    f=$(find "$x/root/lib/modules" -name "$m.ko" | head -n1)
    [[ -n $f ]] || fail_setup "$(basename "$deb") has no $m.ko"
    cp "$f" "$x/out/"
  done
  basename "$x"/root/lib/modules/* >"$x/out/release"
  mkdir -p "$CACHE/kernel"
  mv -T "$x/out" "$KDIR"
  rm -rf "$x"
fi

if ((PREPARE)); then
  log "prepared: $KDIR ($(cat "$KDIR/release"))"
  exit 0
fi

# --- vmm and the reference guest ---------------------------------------------
if [[ -z $VMM ]]; then
  log "building vmm (cargo build -p vmm)"
  cargo build -q -p vmm --manifest-path "$WORKSPACE/Cargo.toml" >&2 || fail_setup "cargo build -p vmm failed"
  VMM=$WORKSPACE/target/debug/vmm
fi
[[ -x $VMM ]] || fail_setup "no vmm binary at $VMM"
# The benchmarks also run vmm_bench's exit round trip (a bare KVM_RUN loop vs vmm).
BENCH_BIN=
if [[ " ${TESTS[*]} " == *" bench "* ]]; then
  BENCH_BIN=${MIRRORBALL_NESTED_BENCH_BIN:-}
  if [[ -z $BENCH_BIN ]]; then
    log "building vmm_bench (cargo bench --no-run)"
    cargo bench -q -p vmm --bench vmm_bench --no-run --manifest-path "$WORKSPACE/Cargo.toml" >&2 ||
      fail_setup "cargo bench --no-run failed"
    BENCH_BIN=$(ls -t "$WORKSPACE"/target/release/deps/vmm_bench-* | grep -v '\.d$' | head -n1)
  fi
  # "none": skip the exit round trip.
  [[ $BENCH_BIN == none ]] && BENCH_BIN=
  [[ -z $BENCH_BIN || -x $BENCH_BIN ]] || fail_setup "no vmm_bench binary ($BENCH_BIN)"
fi
if [[ -n ${MIRRORBALL_KERNEL:-} && -n ${MIRRORBALL_INITRD:-} ]]; then
  GKERNEL=$MIRRORBALL_KERNEL GINITRD=$MIRRORBALL_INITRD
else
  mapfile -t g < <(bash "$WORKSPACE/resources/build-guest.sh" | tail -n2) ||
    fail_setup "resources/build-guest.sh failed"
  GKERNEL=${g[0]:-} GINITRD=${g[1]:-}
fi
[[ -f $GKERNEL && -f $GINITRD ]] || fail_setup "no reference guest (kernel '$GKERNEL', initrd '$GINITRD')"

# --- L1 initramfs (cached per content key) -----------------------------------
mapfile -t LIBS < <(ldd "$VMM" | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }' | sort -u)
L1KEY=$( {
  printf 'l1 %s\n' "$KKEY"
  cat "$HERE/run.sh" "$HERE/l1-init" "$HERE/tests.sh" "$HERE"/l2-*-init "$HERE/ptyrun.c" \
    "$WORKSPACE/guest/linux/test/mbtest.c" "$WORKSPACE/guest/linux/mirrorball_abi.h" \
    "$WORKSPACE/resources/initramfs/mirrorball-study" /bin/busybox "$VMM" "$GKERNEL" "$GINITRD" \
    "${LIBS[@]}" ${BENCH_BIN:+"$BENCH_BIN"}
  gcc --version | head -n1
} | hash16)
L1=$CACHE/l1/$L1KEY
if [[ ! -f $L1/l1.cpio ]]; then
  log "building the L1 initramfs ($L1KEY)"
  x=$(mktemp -d "$CACHE/tmp/l1.XXXXXX")
  trap 'rm -rf -- "$x"' EXIT
  R=$x/root
  mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,results,guest,modules,lib64,usr/bin}
  cp /bin/busybox "$R/bin/busybox"
  for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -s busybox "$R/bin/$a"; done
  cp "$HERE/l1-init" "$R/init"
  cp "$HERE/tests.sh" "$R/tests.sh"
  chmod 755 "$R/init" "$R/tests.sh"
  gcc -O2 -Wall -Wextra -Werror -static -o "$R/bin/ptyrun" "$HERE/ptyrun.c" -lutil
  for m in "${MODULES[@]}"; do cp "$KDIR/$m.ko" "$R/modules/"; done
  echo "${MODULES[*]}" >"$R/modules/order"
  # vmm without its debug info, and the libraries it links at their paths.
  objcopy --strip-debug "$VMM" "$R/bin/vmm"
  [[ -n $BENCH_BIN ]] && objcopy --strip-debug "$BENCH_BIN" "$R/bin/vmm_bench"
  for l in "${LIBS[@]}"; do
    mkdir -p "$R$(dirname "$l")"
    cp -L "$l" "$R$l"
  done
  # L2 guests: the reference kernel and initramfs; the stock cloud kernel.
  cp "$GKERNEL" "$R/guest/bzImage"
  cp "$GINITRD" "$R/guest/initramfs.cpio"
  cp "$KDIR/vmlinuz" "$R/guest/stock-vmlinuz"
  # L2 initramfs variants: the reference initramfs with a cpio appended that
  # replaces /init (the kernel unpacks concatenated archives in order, later
  # files win). overlay NAME INIT [SRC:DEST...]
  overlay() {
    local name=$1 init=$2 o=$x/overlay-$1 f
    shift 2
    mkdir -p "$o/bin"
    cp "$WORKSPACE/resources/initramfs/mirrorball-study" "$o/bin/mirrorball-study"
    if [[ -n $init ]]; then
      cp "$init" "$o/init"
      chmod 755 "$o/init"
    fi
    for f in "$@"; do cp "${f%%:*}" "$o/${f#*:}"; done
    chmod 755 "$o/bin/mirrorball-study"
    (cd "$o" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$x/$name.overlay"
    cat "$GINITRD" "$x/$name.overlay" >"$R/guest/$name.cpio"
  }
  # The driver checks run mbtest (guest/linux/test/mbtest.c) against our device.
  gcc -O2 -Wall -Wextra -Werror -static -I"$WORKSPACE/guest/linux" -o "$x/mbtest" \
    "$WORKSPACE/guest/linux/test/mbtest.c"
  overlay mbtest "$HERE/l2-mbtest-init" "$x/mbtest:mbtest"
  # The case studies: the reference /init, this tree's study script.
  overlay study ""
  # The stock kernel's /init reports brand, RTC and i8042.
  overlay stock "$HERE/l2-stock-init"
  # A template and clones of it with a copy-on-write disk (test_snapdisk).
  overlay snapdisk "$HERE/l2-snapdisk-init"
  # Power off: an /init that only runs `poweroff -f` (without ACPI Linux then
  # halts every CPU with interrupts off).
  printf '#!/bin/sh\necho MIRRORBALL-POWEROFF\npoweroff -f\n' >"$x/poweroff-init"
  chmod 755 "$x/poweroff-init"
  overlay poweroff "$x/poweroff-init"
  (cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$x/l1.cpio"
  mkdir -p "$x/out"
  mv "$x/l1.cpio" "$x/out/"
  mkdir -p "$CACHE/l1"
  # Keep only the newest few initramfs images (each is tens of MB).
  { ls -1dt "$CACHE"/l1/*/ 2>/dev/null || true; } | tail -n +4 | xargs -r rm -rf --
  mv -T "$x/out" "$L1"
  rm -rf "$x"
  trap - EXIT
fi
exec 9>&-

# --- boot L1 (again when it dies or freezes mid-way) ---------------------------
[[ -n $OUT ]] || OUT=$(mktemp -d "${TMPDIR:-/tmp}/mb-nested.XXXXXX")
mkdir -p "$OUT"
rm -rf "$OUT/files" "$OUT"/*.tar "$OUT"/*console.log "$OUT/results.txt"
mkdir -p "$OUT/files"
: >"$OUT/results.txt"
T_PREP=$((SECONDS - T0))
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
# L1 prints NESTED-ALIVE every 15 s: a console silent for this long means L1 froze.
SILENT_LIMIT=${MIRRORBALL_NESTED_SILENT_LIMIT:-120}
MAX_BOOTS=3

# boot_l1 N TEST...: boots L1 once for these tests (console bootN.console.log,
# files bootN.files.tar) and watches it; sets STOP_WHY when it had to stop it.
boot_l1() {
  local n=$1 con=$OUT/boot$1.console.log tarf=$OUT/boot$1.files.tar qemu seen=0 deadline
  shift
  STOP_WHY=
  log "booting L1 #$n ($(du -m "$L1/l1.cpio" | cut -f1) MB initramfs), tests: $*"
  : >"$con"
  # Multi-threaded TCG: with one TCG thread for both L1 CPUs, an L2 Linux on 2
  # vCPUs hangs in its first cross-CPU TLB flush (mark_rodata_ro). The L1
  # console goes to $con; ttyS1 is a raw byte channel (a tar stream per test).
  qemu-system-x86_64 -accel tcg,thread=${MIRRORBALL_NESTED_TCG_THREAD:-multi} -cpu EPYC,+svm,+npt -smp 2 -m "$L1_MEM" \
    -display none -monitor none -no-reboot -net none \
    -chardev file,id=con,path="$con" -serial chardev:con \
    -chardev file,id=files,path="$tarf" -serial chardev:files \
    -kernel "$KDIR/vmlinuz" -initrd "$L1/l1.cpio" \
    -append "console=ttyS0 panic=-1 quiet tsc=reliable${khz:+ tsc_early_khz=$khz} mb.tests=$(IFS=,; echo "$*")${MIRRORBALL_NESTED_VERBOSE:+ mb.verbose=1}" \
    </dev/null 2> >(grep -v 'host doesn.t support requested feature\|TCG doesn.t support requested feature' >&2) &
  qemu=$!
  while kill -0 "$qemu" 2>/dev/null; do
    if ((SECONDS > BED_DEADLINE)); then
      STOP_WHY="the test bed's $TIMEOUT s ran out"
    # An L1 kernel that panicked or locked up (seen now and then under QEMU's emulated SVM on
    # a loaded machine) will not finish.
    elif grep -aq 'Kernel panic\|BUG: soft lockup' "$con"; then
      STOP_WHY="the L1 kernel failed (panic or soft lockup)"
    elif (($(date +%s) - $(stat -c %Y "$con") > SILENT_LIMIT)); then
      STOP_WHY="L1 printed nothing for $SILENT_LIMIT s (frozen)"
    fi
    if [[ -n $STOP_WHY ]]; then
      log "$STOP_WHY; stopping QEMU"
      kill "$qemu" 2>/dev/null || true
      break
    fi
    # Echo the markers as they come (progress for a person watching).
    n=$(grep -ac '^NESTED-[BERT]' "$con" || true)
    if ((n > seen)); then
      grep -a '^NESTED-[BERT]' "$con" | tail -n +$((seen + 1)) | sed 's/^/nested: /' >&2
      seen=$n
    fi
    sleep 0.5
  done
  wait "$qemu" 2>/dev/null || true
  grep -a '^NESTED-[BERT]' "$con" | tail -n +$((seen + 1)) | sed 's/^/nested: /' >&2 || true
  if [[ -z $STOP_WHY ]] && ! grep -aq '^NESTED-DONE' "$con"; then
    STOP_WHY="L1 ended early"
    grep -aq 'Kernel panic' "$con" && STOP_WHY="the L1 kernel panicked"
  fi
  tr -d '\r' <"$con" | grep -a '^NESTED-END ' | sed 's/^NESTED-END //' >>"$OUT/results.txt" || true
  # One tar stream per finished test: GNU tar reads them all with -i.
  if [[ -s $tarf ]]; then
    tar -xif "$tarf" -C "$OUT/files" 2>/dev/null || log "boot $n: the last files stream is incomplete"
  fi
}

T1=$SECONDS
BED_DEADLINE=$((SECONDS + TIMEOUT))
remaining=("${TESTS[@]}")
retried=" "
boots=0
while ((${#remaining[@]} && boots < MAX_BOOTS && SECONDS < BED_DEADLINE)); do
  boots=$((boots + 1))
  boot_l1 "$boots" "${remaining[@]}"
  con=$OUT/boot$boots.console.log
  grep -aq '^NESTED-DONE' "$con" && break
  # L1 died or froze inside a test: the others run in a new L1; that test once more.
  current=$(tr -d '\r' <"$con" | awk '/^NESTED-BEGIN / { t = $2 } /^NESTED-END / { if ($2 == t) t = "" } END { print t }')
  if [[ -n $current ]]; then
    if [[ $retried == *" $current "* ]]; then
      echo "$current rc=125 secs=? (L1 stopped during it twice: $STOP_WHY)" >>"$OUT/results.txt"
    else
      retried+="$current "
    fi
  fi
  left=()
  for t in "${remaining[@]}"; do
    grep -q "^$t " "$OUT/results.txt" || left+=("$t")
  done
  remaining=("${left[@]}")
  ((${#remaining[@]})) &&
    log "L1 stopped${current:+ during $current} ($STOP_WHY); again for: ${remaining[*]}"
done
T_RUN=$((SECONDS - T1))

# console.log: every boot's console, in order.
for ((i = 1; i <= boots; i++)); do
  ((boots > 1)) && echo "=== nested test bed: L1 boot $i ==="
  cat "$OUT/boot$i.console.log"
done >"$OUT/console.log"
boot=$(sed -n 's/^NESTED-READY uptime=\([0-9.]*\).*/\1/p' "$OUT/console.log" | head -n1)
printf 'prepare %s\nl1_ready_uptime %s\nqemu_total %s\nl1_boots %s\n' "$T_PREP" "${boot:-?}" "$T_RUN" "$boots" >"$OUT/timings.txt"
rc=0
for t in "${TESTS[@]}"; do
  line=$(grep "^$t " "$OUT/results.txt" | tail -n1 || true)
  if [[ -z $line ]]; then
    log "$t: no result"
    rc=1
  elif [[ $line != *" rc=0 "* ]]; then
    log "$t: FAILED ($line)"
    rc=1
  fi
done
log "prepare ${T_PREP} s, L1 run ${T_RUN} s in $boots boot(s) (L1 ready at ${boot:-?} s of uptime)"
printf '%s\n' "$OUT"
exit $rc
