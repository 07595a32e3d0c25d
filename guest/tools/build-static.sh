#!/usr/bin/env bash
# Builds the guest tools (work, monitor, register) as static glibc binaries for the Linux
# guest's initramfs.
#
#   guest/tools/build-static.sh [TARGET_DIR]
#
# TARGET_DIR: cargo's target directory (default: $HOME/.cache/mirrorball/tools-target). It is
# kept apart from the workspace's own target directory because the static build uses different
# RUSTFLAGS, which would otherwise make every later build recompile everything.
#
# stdout: the LAST line is the directory holding `work`, `monitor` and `register`.
# stderr: progress (cargo's output included).
# Exit status: non-zero if the build fails or a binary is not static (has a PT_INTERP program
# header or NEEDED shared libraries).
#
# The static flag is set here only (never in a workspace-wide cargo config). Symbols are
# stripped through the release profile's `strip` setting, which only this build overrides.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TARGET=x86_64-unknown-linux-gnu
BINS=(work monitor register)

log() { printf 'build-static: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

target_dir="${1:-${HOME:?HOME is not set}/.cache/mirrorball/tools-target}"
mkdir -p "$target_dir"
target_dir="$(cd "$target_dir" && pwd)"

command -v cargo >/dev/null || die "cargo not found"
command -v readelf >/dev/null || die "readelf not found (binutils)"

log "building ${BINS[*]} for $TARGET (static) in $target_dir"
# CARGO_ENCODED_RUSTFLAGS would take precedence over RUSTFLAGS: drop it.
(
  cd "$ROOT"
  unset CARGO_ENCODED_RUSTFLAGS
  RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release -p mirrorball-guest-tools --target "$TARGET" --target-dir "$target_dir"
) >&2 || die "cargo build failed"

out="$target_dir/$TARGET/release"
for bin in "${BINS[@]}"; do
  f="$out/$bin"
  [[ -x "$f" ]] || die "$f: missing"
  headers="$(readelf -lW "$f")" || die "$f: readelf -l failed"
  if grep -q 'INTERP' <<<"$headers"; then
    die "$f: has a PT_INTERP program header (dynamically linked)"
  fi
  dynamic="$(readelf -dW "$f")" || die "$f: readelf -d failed"
  if grep -q '(NEEDED)' <<<"$dynamic"; then
    die "$f: needs shared libraries: $(grep '(NEEDED)' <<<"$dynamic" | tr -s ' ' | tr '\n' ';')"
  fi
  log "$bin: static, $(stat -c %s "$f") bytes"
done

printf '%s\n' "$out"
