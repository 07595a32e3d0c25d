#!/usr/bin/env bash
# check-build.sh - build the Mirrorball profiler module out of tree against
# Debian's cloud-amd64 kernel headers, warning-free (W=1, -Werror).
#
# Installs linux-headers-cloud-amd64 if it is missing (needs root). The build
# happens in a scratch copy of this directory, so the source tree stays clean.
#
# stdout: the path of the built mirrorball.ko (last line).
# stderr: progress, and the compiler output if the build fails.
# Idempotent: a second run with nothing changed prints only the path.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${MIRRORBALL_DRIVER_OUT:-${TMPDIR:-/tmp}/mirrorball-driver-build}
HEADERS_PKG=linux-headers-cloud-amd64
# What the build needs from this directory, as globs (new, renamed or split
# source files need no edit here).
SOURCES=('*.c' '*.h' Kbuild Makefile)
shopt -s nullglob

log() { printf 'check-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

headers_dir() {
	local d
	d=$(ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -n1)
	[[ -n $d && -f $d/Makefile ]] && printf '%s\n' "$d"
}

ensure_headers() {
	local status
	status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$HEADERS_PKG" 2>/dev/null || true)
	if [[ $status == ii* ]] && headers_dir >/dev/null; then
		return 0
	fi
	((EUID == 0)) || die "$HEADERS_PKG missing (run as root, or: sudo apt-get install $HEADERS_PKG)"
	log "installing $HEADERS_PKG"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "$HEADERS_PKG" >&2
	headers_dir >/dev/null || die "no /usr/src/linux-headers-*-cloud-amd64 after installing $HEADERS_PKG"
}

main() {
	command -v dpkg-query >/dev/null || die "needs a Debian host (dpkg-query not found)"
	ensure_headers
	local kdir f pat stamp logf
	local -a files=()
	kdir=$(headers_dir)
	for pat in "${SOURCES[@]}"; do
		# shellcheck disable=SC2206 # the glob is meant to expand
		files+=("$HERE"/$pat)
	done
	mkdir -p "$OUT"
	# Sources gone from here (removed, renamed, split) go from the copy too.
	for f in "$OUT"/*.c "$OUT"/*.h; do
		[[ $f == *.mod.c || -e $HERE/${f##*/} ]] || rm -f -- "$f"
	done
	# Copy only what changed, so make sees unchanged timestamps.
	for f in "${files[@]}"; do
		cmp -s "$f" "$OUT/${f##*/}" || cp "$f" "$OUT/${f##*/}"
	done
	# Rebuild when the headers or the flags change, too.
	stamp="kdir=$kdir $(stat -c %Y "$kdir/Module.symvers" 2>/dev/null) W=1 -Werror"
	if [[ ! -f $OUT/.stamp || $(cat "$OUT/.stamp") != "$stamp" ]]; then
		rm -f -- "$OUT/mirrorball.ko" "$OUT"/*.o
		printf '%s\n' "$stamp" >"$OUT/.stamp"
	fi
	logf="$OUT/build.log"
	if ! make -s -C "$kdir" M="$OUT" W=1 KCFLAGS=-Werror modules >"$logf" 2>&1; then
		cat "$logf" >&2
		die "build failed (log: $logf)"
	fi
	# Any diagnostic at all counts as a failure (-Werror misses notes).
	if grep -Ei 'warning|error' "$logf" >&2; then
		die "the build printed diagnostics (log: $logf)"
	fi
	[[ -f $OUT/mirrorball.ko ]] || die "no mirrorball.ko in $OUT"
	printf '%s\n' "$OUT/mirrorball.ko"
}

main "$@"
