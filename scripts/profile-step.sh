#!/usr/bin/env bash
# Where a step's CPU time goes, ours against the PyTorch reference, on the same cores in one
# sitting: perf samples every thread of the Rust step bench (burn-flex) and of
# ../shared/bench/torch_simmim_step.py, and sorts each sample by the function it landed in:
#   gemm   matrix-multiply kernels and their packing (gemm crate; MKL's sgemm in PyTorch)
#   wait   threads spinning for work (rayon's yield loop; OpenMP's spin in PyTorch)
#   other  everything else: element-wise ops, copies, allocation and the kernel clearing
#          fresh pages for it, autodiff bookkeeping
# Each program runs twice, with SHORT and LONG measured steps after one warm-up step; the
# difference of the two counts divided by the difference of the steps is the cost of one
# steady step (start-up, model building and the warm-up cancel). Columns are core-seconds
# per step and the step's wall seconds.
# Usage: scripts/profile-step.sh [model batch [extra args]] (default: the four bench configs)
# Needs perf and the reference's venv (see scripts/bench.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${TORCH_PYTHON:-$root/.venv-torchref/bin/python}"
ref="$root/../shared/bench/torch_simmim_step.py"
short="${SHORT:-2}" long="${LONG:-6}" freq="${FREQ:-499}"
command -v perf >/dev/null || { echo "profile-step.sh: perf is not installed" >&2; exit 1; }
export MIMALLOC_PURGE_DELAY=-1 MIMALLOC_RESERVE_OS_MEMORY=4GiB
bin=$(cargo bench -p simmim-model --bench step --no-run 2>&1 |
  grep -o 'target/release/deps/step-[0-9a-f]*' | tail -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ $# -gt 0 ]; then configs=("$*"); else
  configs=("swin_micro 64" "swin_tiny 8 --img 192 --window 6" "swin_base 4 --img 192 --window 6" "vit_base 4 --img 224")
fi

# Prints "gemm wait other wall" for one perf recording and its program's output.
classify() {
  perf script -i "$1" -F ip,sym,dso 2>/dev/null | python3 -c '
import re, sys
counts = dict(gemm=0, wait=0, other=0)
for line in sys.stdin:  # one sample per line (recorded without call chains)
    if not line.strip():
        continue
    if re.search(r"gemm|sgemm|mkl_blas", line): counts["gemm"] += 1
    elif re.search(r"libgomp|sched_yield|rayon_core::sleep|crossbeam_deque|wait_until", line): counts["wait"] += 1
    else: counts["other"] += 1
print(" ".join(str(counts[k]) for k in ("gemm", "wait", "other")))'
}

run_rust() { # model batch steps extra...
  local model=$1 batch=$2 steps=$3; shift 3
  perf record -q -F "$freq" -o "$work/perf.data" "$bin" --model "$model" --batch "$batch" \
    --steps "$steps" --warmup 1 --json "$@" 2>/dev/null | grep '^{' >"$work/out.json"
  echo "$(classify "$work/perf.data") $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["step_s"])' "$work/out.json")"
}
run_torch() {
  local model=$1 batch=$2 steps=$3; shift 3
  perf record -q -F "$freq" -o "$work/perf.data" "$py" "$ref" --model "$model" --batch "$batch" \
    --steps "$steps" --warmup 1 --threads 2 --json "$@" 2>/dev/null | grep '^{' >"$work/out.json"
  echo "$(classify "$work/perf.data") $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["step_s_median"])' "$work/out.json")"
}

echo "| model | batch | impl | gemm core-s | wait core-s | other core-s | work (gemm + other) core-s | step wall s |"
echo "|---|---|---|---|---|---|---|---|"
for cfg in "${configs[@]}"; do
  set -- $cfg
  model=$1 batch=$2; shift 2
  for impl in torch rust; do
    a=$("run_$impl" "$model" "$batch" "$short" "$@")
    b=$("run_$impl" "$model" "$batch" "$long" "$@")
    python3 - "$model" "$batch" "$impl" "$a" "$b" "$((long - short))" "$freq" <<'PY'
import sys
model, batch, impl, a, b, steps, freq = sys.argv[1:]
a, b = [list(map(float, x.split())) for x in (a, b)]
gemm, wait, other = [(y - x) / int(steps) / int(freq) for x, y in zip(a[:3], b[:3])]
name = "PyTorch" if impl == "torch" else "burn-flex"
print(f"| {model} | {batch} | {name} | {gemm:.2f} | {wait:.2f} | {other:.2f} | {gemm + other:.2f} | {b[3]:.2f} |")
PY
  done
done
