#!/usr/bin/env bash
# build-guest.sh - build Mirrorball's reference Linux guest.
#
# Produces (1) a minimal x86-64 kernel built from Debian's linux-source-6.1
# package (bzImage, plus the ELF vmlinux next to it) and (2) an uncompressed
# newc cpio initramfs holding busybox-static and a tiny /init that prints
# MIRRORBALL-INIT-OK and reboots, or runs the MP3 case study named on the
# kernel command line (mirrorball.study=...), plus the guest tools (work,
# monitor, register: guest/tools, static Rust binaries) in /bin.
#
# stdout: the LAST TWO LINES are the bzImage path, then the initramfs path.
# Next to bzImage: vmlinux, config, System.map, and build/ (the kernel build
# tree, to build modules against; build/source is the source tree).
# stderr: progress. Full build logs are kept next to the outputs.
#
# Cache: ${MIRRORBALL_CACHE_DIR:-$HOME/.cache/mirrorball}/guest (see README.md).
# The output key hashes everything that determines the result, including this
# script itself, so any edit here invalidates the cached outputs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
CONFIG_FRAGMENT="$HERE/guest-kernel.config"
PATCH_DIR="$HERE/patches"
INIT_SCRIPT="$HERE/initramfs/init"
STUDY_SCRIPT="$HERE/initramfs/mirrorball-study"
DRIVER_DIR="$HERE/../guest/linux"
WORKSPACE="$(cd "$HERE/.." && pwd)"
TOOLS_BUILD="$WORKSPACE/guest/tools/build-static.sh"
GUEST_TOOLS=(work monitor register)

CACHE_ROOT="${MIRRORBALL_CACHE_DIR:-$HOME/.cache/mirrorball}/guest"
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
BUSYBOX=/bin/busybox

# Options the VMM relies on. Each must end up "=y" in the final .config, on
# top of every line of guest-kernel.config (which is checked verbatim).
REQUIRED_Y=(
  64BIT PRINTK EARLY_PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD
  BINFMT_ELF BINFMT_SCRIPT PROC_FS SYSFS DEVTMPFS DEVTMPFS_MOUNT MODULES SMP
  X86_MPPARSE HYPERVISOR_GUEST PARAVIRT KVM_GUEST VIRTIO VIRTIO_MMIO
  VIRTIO_MMIO_CMDLINE_DEVICES TMPFS SHMEM UNIX NET KSM KERNEL_LZ4
  VIRT_DRIVERS MIRRORBALL_PROFILER TRACEPOINTS HIGH_RES_TIMERS
)
REQUIRED_OFF=(RANDOMIZE_BASE KUNIT)
MIN_NR_CPUS=8

# Debian packages needed to build (build-essential is covered by gcc,
# libc6-dev and make; lz4 is the kernel compressor's host tool).
PACKAGES=(
  "$SRC_PKG" busybox-static flex bison bc libelf-dev libssl-dev cpio
  gcc libc6-dev make patch xz-utils lz4
)

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- packages ---------------------------------------------------------------

missing_packages() {
  # One dpkg-query for all; unknown packages print nothing, so list the
  # installed ones and report the rest.
  local installed p
  installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${PACKAGES[@]}" 2>/dev/null |
    awk '$1 ~ /^ii/ { print $2 }' || true)
  for p in "${PACKAGES[@]}"; do
    [[ $'\n'$installed$'\n' == *$'\n'"$p"$'\n'* ]] || printf '%s\n' "$p"
  done
}

ensure_packages() {
  command -v dpkg-query >/dev/null || die "needs a Debian-based host (dpkg-query not found)"
  local missing
  mapfile -t missing < <(missing_packages)
  ((${#missing[@]} == 0)) && return 0
  if ((EUID != 0)); then
    die "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
  fi
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >&2; then
    log "apt-get install failed; updating package lists and retrying"
    apt-get -o DPkg::Lock::Timeout=900 update -qq >&2
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  mapfile -t missing < <(missing_packages)
  ((${#missing[@]} == 0)) || die "still missing after apt-get: ${missing[*]}"
}

# --- keys -------------------------------------------------------------------

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

hash_stdin() { sha256sum | cut -c1-16; }

# Patches in apply order, with their contents.
patches_digest() {
  local p
  for p in "$PATCH_DIR"/*.patch; do
    [[ -e $p ]] || continue
    printf 'patch %s\n' "$(basename "$p")"
    cat "$p"
  done
}

# The profiler driver's files (what guest/linux/integrate.sh copies), with
# their contents.
driver_digest() {
  local f
  for f in "$DRIVER_DIR"/integrate.sh "$DRIVER_DIR"/Kbuild "$DRIVER_DIR"/Kconfig \
    "$DRIVER_DIR"/*.c "$DRIVER_DIR"/*.h; do
    [[ -e $f ]] || continue
    printf 'driver %s\n' "$(basename "$f")"
    cat "$f"
  done
}

# The guest tools' sources (and what they build from), with their contents.
tools_digest() {
  local f
  rustc --version
  cat "$WORKSPACE/Cargo.lock" "$WORKSPACE/Cargo.toml"
  while IFS= read -r f; do
    printf 'tools %s\n' "${f#"$WORKSPACE"/}"
    cat "$f"
  done < <(find "$WORKSPACE/guest/tools" "$WORKSPACE/guest/workload" "$WORKSPACE/profiler/abi" \
    -type f \( -name '*.rs' -o -name Cargo.toml -o -name '*.sh' \) -not -path '*/target/*' | LC_ALL=C sort)
}

compute_keys() {
  SRC_VERSION=$(pkg_version "$SRC_PKG")
  SRC_KEY=$( { printf 'src %s\n' "$SRC_VERSION"; patches_digest; } | hash_stdin)
  KERNEL_KEY=$( {
    printf 'kernel\n'
    cat "$SELF"
    printf 'src %s\n' "$SRC_KEY"
    cat "$CONFIG_FRAGMENT"
    driver_digest
    gcc --version | head -n1
    ld --version | head -n1
    uname -m
  } | hash_stdin)
  INITRAMFS_KEY=$( {
    printf 'initramfs\n'
    cat "$SELF"
    printf 'src %s\n' "$SRC_VERSION"   # gen_init_cpio comes from the source
    printf 'busybox %s\n' "$(pkg_version busybox-static)"
    cat "$INIT_SCRIPT" "$STUDY_SCRIPT"
    tools_digest
  } | hash_stdin)
  KEY=$(printf '%s %s\n' "$KERNEL_KEY" "$INITRAMFS_KEY" | hash_stdin)
}

# --- cache helpers ----------------------------------------------------------

TMP_DIRS=()
cleanup() {
  local d
  for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do rm -rf -- "$d"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

new_tmp() { # new_tmp VAR NAME: VAR := a fresh dir under $CACHE_ROOT/tmp, removed at exit
  local d
  d=$(mktemp -d "$CACHE_ROOT/tmp/$2.XXXXXX")
  TMP_DIRS+=("$d")
  printf -v "$1" '%s' "$d"
}

publish() { # publish TMPDIR FINALDIR: atomic rename into place
  mkdir -p "$(dirname "$2")"
  chmod 755 "$1"
  mv -T -- "$1" "$2"
}

complete() { # complete DIR FILE...: DIR holds every FILE
  local d=$1 f
  shift
  for f in "$@"; do [[ -s $d/$f ]] || return 1; done
}

# --- source tree ------------------------------------------------------------

# Extracted and patched once per (package version, patch set). Builds are
# out-of-tree (make O=...), so the tree is never written after this.
ensure_source() {
  SRC_DIR="$CACHE_ROOT/src/linux-$SRC_VERSION-$SRC_KEY"
  [[ -f $SRC_DIR/.mirrorball-ready ]] && return 0
  [[ -f $SRC_TARBALL ]] || die "$SRC_TARBALL not found (is $SRC_PKG installed?)"
  log "extracting $SRC_TARBALL ($SRC_PKG $SRC_VERSION)"
  local t p
  new_tmp t src
  tar -C "$t" --strip-components=1 -xJf "$SRC_TARBALL"
  for p in "$PATCH_DIR"/*.patch; do
    [[ -e $p ]] || continue
    log "applying $(basename "$p")"
    patch -d "$t" -p1 --batch --forward --quiet <"$p" >&2 || die "patch $(basename "$p") failed"
  done
  touch "$t/.mirrorball-ready"
  # Source trees are large (~1.4 GB); keep only the current one. Safe: every
  # build runs under the cache lock, which we hold.
  local old
  for old in "$CACHE_ROOT"/src/linux-*; do
    [[ -e $old ]] || continue
    log "removing old source tree $old"
    rm -rf -- "$old"
  done
  publish "$t" "$SRC_DIR"
}

# --- kernel -----------------------------------------------------------------

check_config() { # check_config DOTCONFIG: fail unless the result is what we asked for
  local cfg=$1 line opt bad=()
  while IFS= read -r line; do
    case $line in
      CONFIG_*=*) grep -qxF -- "$line" "$cfg" || bad+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$cfg" || echo unset))") ;;
      "# CONFIG_"*" is not set")
        opt=${line#\# }; opt=${opt%% *}
        grep -q "^$opt=" "$cfg" && bad+=("$line (got: $(grep "^$opt=" "$cfg"))") ;;
    esac
  done <"$CONFIG_FRAGMENT"
  for opt in "${REQUIRED_Y[@]}"; do
    grep -qx "CONFIG_$opt=y" "$cfg" || bad+=("CONFIG_$opt=y (required)")
  done
  for opt in "${REQUIRED_OFF[@]}"; do
    grep -q "^CONFIG_$opt=" "$cfg" && bad+=("CONFIG_$opt must be off")
  done
  local n
  n=$(sed -n 's/^CONFIG_NR_CPUS=//p' "$cfg")
  [[ -n $n ]] && ((n >= MIN_NR_CPUS)) || bad+=("CONFIG_NR_CPUS>=$MIN_NR_CPUS (got: ${n:-unset})")
  if ((${#bad[@]})); then
    log "the final .config does not match the request:"
    printf '  %s\n' "${bad[@]}" >&2
    return 1
  fi
}

run_logged() { # run_logged LOG CMD...: append output to LOG, show its tail on failure
  local logf=$1
  shift
  if ! "$@" >>"$logf" 2>&1; then
    log "command failed: $*"
    tail -n 40 "$logf" >&2
    # The build dir is removed on exit; keep the log where it can be read.
    cp "$logf" "$CACHE_ROOT/tmp/failed-build.log"
    log "full log: $CACHE_ROOT/tmp/failed-build.log"
    return 1
  fi
}

build_kernel() {
  local out="$CACHE_ROOT/kernel/$KERNEL_KEY"
  KERNEL_DIR=$out
  complete "$out" bzImage vmlinux config && return 0
  ensure_source
  # The driver goes into the shared tree here, under the cache lock, so the
  # tree always holds the driver of the build that is running (integrate.sh
  # is idempotent and replaces files rather than writing through them).
  log "adding the profiler driver (guest/linux) as drivers/virt/mirrorball"
  bash "$DRIVER_DIR/integrate.sh" "$SRC_DIR" >&2 || die "guest/linux/integrate.sh failed"
  local b o jobs logf
  new_tmp b kbuild
  new_tmp o kout
  logf="$o/build.log"
  jobs=$(nproc)
  local mk=(make -C "$SRC_DIR" O="$b" ARCH=x86_64
    KBUILD_BUILD_USER=mirrorball KBUILD_BUILD_HOST=mirrorball
    KBUILD_BUILD_TIMESTAMP="$SRC_PKG $SRC_VERSION")
  log "configuring kernel (tinyconfig + $(basename "$CONFIG_FRAGMENT"))"
  run_logged "$logf" "${mk[@]}" tinyconfig
  run_logged "$logf" env -C "$b" "$SRC_DIR/scripts/kconfig/merge_config.sh" -m -O "$b" \
    "$b/.config" "$CONFIG_FRAGMENT"
  run_logged "$logf" "${mk[@]}" olddefconfig
  if ! check_config "$b/.config"; then
    cp "$b/.config" "$CACHE_ROOT/tmp/rejected.config"
    die "kernel config check failed (final .config saved as $CACHE_ROOT/tmp/rejected.config)"
  fi
  log "building kernel with -j$jobs (log: $logf)"
  local t0=$SECONDS
  # "modules" too: it writes Module.symvers, which module builds against
  # build/ need (there are no modules of our own; the driver is built in).
  run_logged "$logf" "${mk[@]}" -j"$jobs" bzImage modules
  log "kernel built in $((SECONDS - t0)) s"
  cp "$b/arch/x86/boot/bzImage" "$o/bzImage"
  cp "$b/vmlinux" "$o/vmlinux"
  cp "$b/.config" "$o/config"
  cp "$b/System.map" "$o/System.map"
  printf '%s\n' "$SRC_VERSION" >"$o/linux-source-version"
  # Keep the build tree (objects, Module.symvers, generated headers): modules
  # for this exact kernel are built against it, e.g. the fake profiler device
  # of guest/linux/test/run-qemu-test.sh. Its "source" link names the tree.
  mv -T -- "$b" "$o/build"
  publish "$o" "$out"
  # Build trees are large (~120 MB); keep only the newest kernel's, as with
  # the source tree. Safe: we hold the cache lock.
  local old
  for old in "$CACHE_ROOT"/kernel/*/build; do
    [[ -e $old && $old != "$out/build" ]] || continue
    log "removing old build tree $old"
    rm -rf -- "$old"
  done
}

# --- initramfs --------------------------------------------------------------

build_initramfs() {
  local out="$CACHE_ROOT/initramfs/$INITRAMFS_KEY"
  INITRAMFS_DIR=$out
  complete "$out" initramfs.cpio && return 0
  ensure_source
  [[ -x $BUSYBOX ]] || die "$BUSYBOX not found (is busybox-static installed?)"
  file_is_static "$BUSYBOX" || die "$BUSYBOX is not statically linked"
  log "building initramfs"
  local o list applet tools t
  new_tmp o initramfs
  log "building the guest tools (${GUEST_TOOLS[*]})"
  # build-static.sh itself checks that each tool is there and statically linked.
  tools=$(bash "$TOOLS_BUILD" "$CACHE_ROOT/tools-target" | tail -n 1) || die "guest/tools/build-static.sh failed"
  gcc -O2 -o "$o/gen_init_cpio" "$SRC_DIR/usr/gen_init_cpio.c"
  list="$o/initramfs.list"
  {
    local d
    for d in /dev /proc /sys /tmp /run /root /etc /mnt /bin /sbin /usr /usr/bin /usr/sbin; do
      printf 'dir %s 0755 0 0\n' "$d"
    done
    # The kernel opens /dev/console before /init runs; devtmpfs is not mounted
    # automatically on an initramfs root, so the node must be in the archive.
    printf 'nod /dev/console 0600 0 0 c 5 1\n'
    printf 'nod /dev/null 0666 0 0 c 1 3\n'
    printf 'file /bin/busybox %s 0755 0 0\n' "$BUSYBOX"
    printf 'file /init %s 0755 0 0\n' "$INIT_SCRIPT"
    printf 'file /bin/mirrorball-study %s 0755 0 0\n' "$STUDY_SCRIPT"
    for t in "${GUEST_TOOLS[@]}"; do
      printf 'file /bin/%s %s 0755 0 0\n' "$t" "$tools/$t"
    done
    "$BUSYBOX" --list-full | sort | while read -r applet; do
      [[ $applet == bin/busybox ]] && continue
      [[ " ${GUEST_TOOLS[*]} " == *" ${applet##*/} "* ]] && continue
      printf 'slink /%s /bin/busybox 0777 0 0\n' "$applet"
    done
  } >"$list"
  "$o/gen_init_cpio" -t 0 "$list" >"$o/initramfs.cpio"
  rm -f "$o/gen_init_cpio"
  publish "$o" "$out"
}

file_is_static() {
  # A static ELF has no PT_INTERP program header.
  ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'INTERP'
}

# --- main -------------------------------------------------------------------

main() {
  (($# == 0)) || die "usage: $0   (no arguments; set MIRRORBALL_CACHE_DIR to move the cache)"
  for f in "$CONFIG_FRAGMENT" "$INIT_SCRIPT" "$STUDY_SCRIPT"; do [[ -f $f ]] || die "$f missing"; done

  ensure_packages
  compute_keys
  local final="$CACHE_ROOT/$KEY"

  if ! complete "$final" bzImage vmlinux initramfs.cpio; then
    mkdir -p "$CACHE_ROOT/tmp"
    exec 9>"$CACHE_ROOT/.lock"
    if ! flock -n 9; then
      log "waiting for another build-guest.sh (lock $CACHE_ROOT/.lock)"
      flock 9
    fi
    # Holding the lock, nothing else is building: leftovers in tmp/ come
    # from runs that were killed.
    find "$CACHE_ROOT/tmp" -mindepth 1 -maxdepth 1 -type d -exec rm -rf -- {} +
    # Another run may have finished the same key while we waited.
    if ! complete "$final" bzImage vmlinux initramfs.cpio; then
      build_kernel
      build_initramfs
      local t f
      new_tmp t out
      for f in bzImage vmlinux config System.map build.log linux-source-version; do
        ln "$KERNEL_DIR/$f" "$t/$f" 2>/dev/null || cp "$KERNEL_DIR/$f" "$t/$f"
      done
      ln -s "$KERNEL_DIR/build" "$t/build"
      for f in initramfs.cpio initramfs.list; do
        ln "$INITRAMFS_DIR/$f" "$t/$f" 2>/dev/null || cp "$INITRAMFS_DIR/$f" "$t/$f"
      done
      printf 'kernel %s\ninitramfs %s\n' "$KERNEL_KEY" "$INITRAMFS_KEY" >"$t/keys"
      publish "$t" "$final"
      log "done: $final"
    fi
    exec 9>&-
  fi

  printf '%s\n' "$final/bzImage" "$final/initramfs.cpio"
}

main "$@"
