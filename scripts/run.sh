#!/usr/bin/env bash
# The main job on its embedded default. Until `coordinator start` lands (issue: pretraining end
# to end), this runs what exists: one SimMIM pretraining step, timed, on the CPU backend.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
export MIMALLOC_PURGE_DELAY="${MIMALLOC_PURGE_DELAY:--1}" MIMALLOC_RESERVE_OS_MEMORY="${MIMALLOC_RESERVE_OS_MEMORY:-4GiB}"
exec cargo bench -p simmim-model --bench step -- "$@"
