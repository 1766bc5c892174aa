#!/usr/bin/env bash
# GPU step benchmark, in two halves because the GPU machine has no Rust toolchain:
#   scripts/gpu_bench.sh stage   # here: build the burn-cuda bench, stage it in devbin/ (ignored)
#   scripts/gpu_bench.sh run     # there (carry devbin/): NCCL check, Rust step beside the PyTorch reference
# CUBECL_AUTOTUNE_LEVEL and CUBECL_DEBUG_LOG are passed through: the first burn-cuda run spends
# minutes compiling kernels (NVRTC) with the GPU idle, so a run needs a generous budget.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
case "${1:-}" in
stage)
  bin=$(cargo bench -p simmim-model --features cuda --bench step --no-run 2>&1 |
    grep -o 'target/release/deps/step-[0-9a-f]*' | tail -1)
  mkdir -p devbin
  cp "$bin" devbin/step-cuda && strip devbin/step-cuda
  nccl=$(cargo bench -p simmim-worker --features cuda --bench nccl --no-run 2>&1 |
    grep -o 'target/release/deps/nccl-[0-9a-f]*' | tail -1)
  cp "$nccl" devbin/nccl-bench && strip devbin/nccl-bench
  cp ../shared/bench/torch_simmim_step.py devbin/
  ls -la devbin
  ;;
run)
  cd devbin
  export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
  py=$(command -v python3 || command -v python)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  limit="${STEP_TIMEOUT:-240}"
  echo "== NCCL transport, 1-rank communicator (libnccl.so must be on LD_LIBRARY_PATH)"
  timeout 120 ./nccl-bench || echo "(exit $?)"
  for dtype in f32 bf16; do
    echo "== burn-cuda swin_base 192 batch 64 $dtype"
    timeout "$limit" ./step-cuda --backend cuda --dtype "$dtype" --model swin_base --batch 64 \
      --steps 5 --warmup 3 --json || echo "(exit $?)"
  done
  for amp in bf16 none; do
    echo "== torch swin_base 192 batch 64 amp=$amp"
    "$py" torch_simmim_step.py --model swin_base --img 192 --window 6 --batch 64 --steps 10 \
      --warmup 3 --device cuda --amp "$amp" --json | tail -1
  done
  ;;
*)
  echo "usage: $0 stage|run" >&2
  exit 2
  ;;
esac
