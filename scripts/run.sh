#!/usr/bin/env bash
# The main job on its embedded default. Until `coordinator start` lands (issue: pretraining end
# to end), this runs what exists: one SimMIM pretraining step, timed, on the CPU backend.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
exec cargo bench -p simmim-model --bench step -- "$@"
