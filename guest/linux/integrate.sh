#!/usr/bin/env bash
# integrate.sh KSRC - add the Mirrorball profiler driver to a Linux source tree
# as drivers/virt/mirrorball (Kconfig: MIRRORBALL_PROFILER, under VIRT_DRIVERS).
#
# Then enable it in the kernel config:
#   CONFIG_VIRT_DRIVERS=y
#   CONFIG_MIRRORBALL_PROFILER=y      (selects CONFIG_TRACEPOINTS)
#
# Idempotent. Files it changes are replaced, never written through, so KSRC
# may be a symlink farm (cp -as) of a shared tree.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The driver's files, as globs in this directory (new, renamed or split source
# files need no edit here). Not the out-of-tree Makefile, nor test/.
FILES=('*.c' '*.h' Kbuild Kconfig)

die() { printf 'integrate: error: %s\n' "$*" >&2; exit 1; }

(($# == 1)) || die "usage: $0 KERNEL_SOURCE_DIR"
K=$1
VIRT=$K/drivers/virt
[[ -f $VIRT/Kconfig && -f $VIRT/Makefile ]] || die "$K is not a Linux source tree (no drivers/virt)"

# replace FILE: stdin becomes FILE's new content (a new file, not a write
# through a symlink or hard link).
replace() {
	local tmp
	tmp=$(mktemp "$1.XXXXXX")
	cat >"$tmp"
	chmod 644 "$tmp"
	mv -f -- "$tmp" "$1"
}

# The driver's files (a fresh directory: nothing stale stays behind).
rm -rf -- "$VIRT/mirrorball"
mkdir -p "$VIRT/mirrorball"
for pat in "${FILES[@]}"; do
	n=0
	for f in "$HERE"/$pat; do
		[[ -f $f ]] || continue
		cp -- "$f" "$VIRT/mirrorball/${f##*/}"
		n=$((n + 1))
	done
	((n > 0)) || die "no $pat in $HERE"
done

# drivers/virt/Kconfig: source ours before the closing "endif" of the
# VIRT_DRIVERS menu (the file's last endif).
if ! grep -q '^source "drivers/virt/mirrorball/Kconfig"' "$VIRT/Kconfig"; then
	last=$(grep -n '^endif' "$VIRT/Kconfig" | tail -n1 | cut -d: -f1)
	[[ -n $last ]] || die "no endif in $VIRT/Kconfig"
	awk -v at="$last" 'NR == at { print "source \"drivers/virt/mirrorball/Kconfig\"\n" } { print }' \
		"$VIRT/Kconfig" | replace "$VIRT/Kconfig"
fi

# drivers/virt/Makefile: descend into our directory.
if ! grep -q '^obj-$(CONFIG_MIRRORBALL_PROFILER)' "$VIRT/Makefile"; then
	{ cat "$VIRT/Makefile"; printf 'obj-$(CONFIG_MIRRORBALL_PROFILER)\t+= mirrorball/\n'; } |
		replace "$VIRT/Makefile"
fi
