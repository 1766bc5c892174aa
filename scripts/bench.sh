#!/usr/bin/env bash
# Side-by-side step benchmark: the Rust step (burn-flex, and burn-ndarray) alternating with the
# PyTorch reference of ../shared/bench on the same cores, for four configurations: swin_micro
# batch 64, swin_tiny 192 window 6 batch 8, and the official swin_base 192 window 6 and
# vit_base 224 at batch 4. Prints one JSON line per run and a summary table with the ratios.
# NDARRAY=1 adds burn-ndarray runs.
# Needs the reference's venv: python3 -m venv .venv-torchref && .venv-torchref/bin/pip install torch timm
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds="${ROUNDS:-2}"
py="${TORCH_PYTHON:-$root/.venv-torchref/bin/python}"
ref="$root/../shared/bench/torch_simmim_step.py"
# Keep freed buffers mapped: Burn allocates a fresh buffer per op (measured: sys time 3.1 s -> 0.7 s).
export MIMALLOC_PURGE_DELAY=-1 MIMALLOC_RESERVE_OS_MEMORY=4GiB
# STEP_BIN: an already built step bench (a copy survives the next build; without ndarray).
bin="${STEP_BIN:-$(cargo bench -p simmim-model --features ndarray --bench step --no-run 2>&1 |
  grep -o 'target/release/deps/step-[0-9a-f]*' | tail -1)}"
out=$(mktemp)
configs=("swin_micro 64" "swin_tiny 8 --img 192 --window 6" "swin_base 4 --img 192 --window 6" "vit_base 4 --img 224")
for ((r = 0; r < rounds; r++)); do
  for cfg in "${configs[@]}"; do
    set -- $cfg
    model=$1 batch=$2; shift 2
    "$bin" --model "$model" --batch "$batch" --steps 5 --warmup 2 --json "$@" | tee -a "$out"
    "$py" "$ref" --model "$model" --batch "$batch" --steps 5 --warmup 2 --threads 2 --json "$@" |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"impl":"torch","backend":"torch","model":d["model"],"batch":d["batch"],"step_s":d["step_s_median"],"fwd_s":d["fwd_s_mean"],"bwd_s":d["bwd_s_mean"],"opt_s":d["clip_opt_s_mean"],"images_per_s":d["batch"]/d["step_s_median"]}))' | tee -a "$out"
    if [ "${NDARRAY:-0}" = 1 ]; then
      "$bin" --backend ndarray --model "$model" --batch "$batch" --steps 5 --warmup 2 --json "$@" | tee -a "$out"
    fi
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("\n| model | batch | torch img/s | burn-flex img/s | flex/torch | burn-ndarray img/s | ndarray/torch |")
print("|---|---|---|---|---|---|---|")
for model in dict.fromkeys(r["model"] for r in runs):
    def pick(b):
        values = [r["images_per_s"] for r in runs if r["model"] == model and r["backend"] == b]
        return statistics.median(values) if values else None
    t, f, n = pick("torch"), pick("flex"), pick("ndarray")
    batch = next(r["batch"] for r in runs if r["model"] == model)
    nd = f"| {n:.2f} | {n/t:.2f}x |" if n else "| - | - |"
    print(f"| {model} | {batch} | {t:.2f} | {f:.2f} | {f/t:.2f}x {nd}")
PY
