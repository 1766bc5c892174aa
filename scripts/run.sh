#!/usr/bin/env bash
# The main job on its embedded default: SimMIM pretraining of a small Swin on CIFAR-10, on CPU,
# through the coordinator and one local worker; results in ./runs/demo (metrics.jsonl,
# recon/*.png, checkpoints/). Arguments go to `coordinator start` (e.g. --config FILE,
# --local-workers N, --max-steps N). Running it again resumes the run where it stopped.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
cargo build --release --workspace --bins
exec target/release/coordinator start "$@"
