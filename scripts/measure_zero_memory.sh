#!/usr/bin/env bash
# Per-rank optimizer memory with and without optimizer-state sharding (train.zero), as the
# README's table reports it: swin_base 192 at one image a worker, two steps, worlds 1-3. Each
# worker runs under /usr/bin/time, whose peak RSS lands at the end of the worker's own log.
# Usage: scripts/measure_zero_memory.sh [OUT_DIR]   (set MIMALLOC_PURGE_DELAY=0 to see the
# live peak instead of what the allocator keeps).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-/tmp/simmim-zero-memory}"
"$root/scripts/setup.sh" >/dev/null
cargo build --release --bins --manifest-path "$root/Cargo.toml" >/dev/null 2>&1
rm -rf "$out" && mkdir -p "$out"
cat > "$out/worker-timed.sh" <<WRAP
#!/bin/bash
exec /usr/bin/time -f "peak_rss_kib=%M" "$root/target/release/worker" "\$@"
WRAP
chmod +x "$out/worker-timed.sh"
for run in 1:0 2:0 2:1 3:0 3:1; do
  world="${run%:*}" zero="${run#*:}"
  name="zero${zero}-world${world}"
  cat > "$out/$name.yaml" <<YAML
run: {name: $name, root: $out/runs, seed: 0}
model: {preset: swin_base}
data: {train: $root/data/cifar10/train, limit: 240}
train: {epochs: 1, warmup_epochs: 0, micro_batch: 1, base_lr: 1.0e-4, zero: $zero, compute_threads: 1, max_steps: 2}
checkpoint: {every_steps: 1000, every_minutes: null}
output: {recon_every_steps: 0}
workers: {min: $world, max: $world, last_call_s: 0}
YAML
  SIMMIM_WORKER_BIN="$out/worker-timed.sh" RUST_LOG=info \
    "$root/target/release/coordinator" start --config "$out/$name.yaml" > "$out/$name.log" 2>&1
done
echo "| run | rank | AdamW moment values | peak RSS MiB |"
echo "|---|---|---|---|"
for log in "$out"/runs/*/logs/*.log; do
  run="$(basename "$(dirname "$(dirname "$log")")")"
  rank="$(grep -m1 -o 'rank=[0-9]* moment_floats' "$log" | cut -d= -f2 | cut -d' ' -f1)"
  floats="$(grep -m1 -o 'moment_floats=[0-9]*' "$log" | cut -d= -f2)"
  kib="$(grep -o 'peak_rss_kib=[0-9]*' "$log" | tail -1 | cut -d= -f2)"
  echo "| $run | $rank | $floats | $((kib / 1024)) |"
done | sort
