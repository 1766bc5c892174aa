#!/usr/bin/env bash
# The CPU image from this host's release binaries, offline: strips target/release's
# `coordinator` and `worker` (or `$SIMMIM_BIN`'s) into target/image/ and builds the Dockerfile's `prebuilt-cpu`
# target on the local debootstrap base (scripts/base-image.sh). With a registry, build the
# multi-stage image instead (deploy/README.md). Prints the image tag.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
tag="${SIMMIM_CPU_IMAGE:-simmim-rs:cpu}"
bin_dir="${SIMMIM_BIN:-target/release}"
base="$(scripts/base-image.sh)"
for bin in coordinator worker; do
  if [ ! -x "$bin_dir/$bin" ]; then
    echo "image: $bin_dir/$bin is missing; run cargo build --release --workspace --bins" >&2
    exit 1
  fi
done
mkdir -p target/image
for bin in coordinator worker; do
  strip --strip-debug -o "target/image/$bin" "$bin_dir/$bin"
done
# The classic builder (no buildx here) builds only the stages up to the target.
DOCKER_BUILDKIT=0 docker build -q -f deploy/Dockerfile --target prebuilt-cpu \
  --build-arg CPU_BASE="$base" -t "$tag" . >&2
size="$(docker image inspect --format '{{.Size}}' "$tag")"
echo "image: $tag, $((size / 1000000)) MB (base $base)" >&2
echo "$tag"
