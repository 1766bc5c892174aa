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
# per step and the long run's median step in wall seconds. Leaf-symbol sorting has an error
# of its own (JIT-compiled oneDNN kernels land in "other"); on 2 cores PyTorch's samples
# added up to 2.1-2.2 cores, so read differences under ~10% as noise.
# Usage: scripts/profile-step.sh [model batch [extra args]] (default: the four bench configs)
# SHORT and LONG (default 2 and 6) set the two runs' steps: keep them 4 or more apart, start-up
# varies by whole core-seconds between runs (1 and 2 gave negative counts).
# THREADS sets PyTorch's threads (default: all cores, as the Rust step uses them).
# Needs perf and the reference's venv (see scripts/bench.sh).
set -euo pipefail
shopt -s inherit_errexit
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${TORCH_PYTHON:-$root/.venv-torchref/bin/python}"
ref="$root/../shared/bench/torch_simmim_step.py"
short="${SHORT:-2}" long="${LONG:-6}" freq="${FREQ:-499}"
threads="${THREADS:-$(nproc)}"
[ "$long" -gt "$short" ] || { echo "profile-step.sh: LONG ($long) must exceed SHORT ($short)" >&2; exit 1; }
command -v perf >/dev/null || { echo "profile-step.sh: perf is not installed" >&2; exit 1; }
export MIMALLOC_PURGE_DELAY=-1 MIMALLOC_RESERVE_OS_MEMORY=4GiB
# STEP_BIN: an already built step bench (as in scripts/bench.sh).
bin=${STEP_BIN:-}
[ -n "$bin" ] || bin=$(cargo bench -p simmim-model --bench step --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "step" and m.get("executable"):
        print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "profile-step.sh: building the step bench failed (cargo bench -p simmim-model --bench step --no-run)" >&2; exit 1; }
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
if sum(counts.values()) == 0:
    sys.exit("profile-step.sh: perf recorded no samples")
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
    --steps "$steps" --warmup 1 --threads "$threads" --json "$@" 2>/dev/null | grep '^{' >"$work/out.json"
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
if len(a) != 4 or len(b) != 4:
    sys.exit(f"profile-step.sh: a {impl} run of {model} produced no result")
gemm, wait, other = [(y - x) / int(steps) / int(freq) for x, y in zip(a[:3], b[:3])]
name = "PyTorch" if impl == "torch" else "burn-flex"
print(f"| {model} | {batch} | {name} | {gemm:.2f} | {wait:.2f} | {other:.2f} | {gemm + other:.2f} | {b[3]:.2f} |")
PY
  done
done
