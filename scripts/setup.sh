#!/usr/bin/env bash
# Idempotent setup for a fresh machine: toolchain check and the bundled dataset unpacked into
# ./data (ignored by git). Safe to run any number of times.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SIMMIM_SHARED:-$root/../shared}"

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }

dataset="$shared/datasets/cifar10"
target="$root/data/cifar10"
if [ -d "$dataset" ] && [ ! -f "$target/.complete" ]; then
  echo "setup: verifying and unpacking CIFAR-10 into $target"
  (cd "$dataset" && sha256sum --quiet -c SHA256SUMS)
  rm -rf "$target.partial" && mkdir -p "$target.partial"
  for split in train test; do
    tar -xzf "$dataset/$split.tar.gz" -C "$target.partial"
  done
  rm -rf "$target" && mv "$target.partial" "$target" && touch "$target/.complete"
fi
