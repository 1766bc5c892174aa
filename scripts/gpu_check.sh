#!/usr/bin/env bash
# The whole GPU path in one scripted run, in two halves (the GPU machine has no Rust toolchain
# and no network):
#   scripts/gpu_check.sh stage               # here: cuda builds, references, data -> devbin/
#   scripts/gpu_check.sh run                 # there, with devbin/ carried: one table at the end
#   scripts/gpu_check.sh stage --stand-in    # here: CPU builds under the same names, and
#   scripts/gpu_check.sh run                 #   the same run on the CPU (rehearsal, small sizes)
# The run stays within GPU_CHECK_BUDGET_S (default 530 s; give the device call a timeout_s of
# 580): every part has a time limit and the table says what did not finish. The parts work in
# devbin/out; $OUT gets the table (gpu_check.md, rewritten after every part) and, when the run
# ends however it ends, gpu_check_logs.tar.xz (the device tool returns at most 8 files).
# Parts, in order of what only a GPU can tell:
#   1. NCCL: the 1-rank transport, host-staged and in place on burn-cuda memory, GB/s
#   2. first step of swin_base 192 batch 64: cold (empty kernel cache), then warm
#   3. step bench: burn f32 / bf16 (autocast) beside PyTorch --amp none / bf16, images/s and
#      peak GPU memory
#   4. coordinator start: the demo model, two workers sharing the GPU over the ring, one
#      SIGKILLed halfway, the survivor resumes from the checkpoint and finishes
#   5. worker export of that run, loaded by PyTorch into the reference model: loss vs Rust
#   6. bf16 autocast against f32, 100 steps of swin_micro: the loss gap per 10 steps
#   7. (staged with GPU_CHECK_AUTOTUNE=1) the step bench with autotune, with what time is left
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
stage_dir="$root/devbin"

# Builds one bench binary and copies it into devbin/bin under the name the run uses.
stage_bench() {  # package bench name [cargo feature args...]
  local package=$1 bench=$2 name=$3 built
  shift 3
  built=$(cargo bench -p "$package" "$@" --bench "$bench" --no-run 2>&1 |
    grep -o "target/release/deps/$bench-[0-9a-f]*" | tail -1 || true)
  [ -n "$built" ] || { echo "stage: building the $bench bench of $package failed" >&2; return 1; }
  cp "$built" "$stage_dir/bin/$name"
}

stage() {
  local stand_in=0
  [ "${1:-}" = "--stand-in" ] && stand_in=1
  rm -rf "$stage_dir" && mkdir -p "$stage_dir"/{bin,py,data}
  local features=() bench_features=()
  if [ "$stand_in" = 0 ]; then
    features=(--features simmim-worker/cuda)
    bench_features=(--features cuda)
    # The GPU machine's toolkit (CUDA 13.0, driver 580): without this cudarc binds to the newest
    # CUDA it knows, whose library names and symbols the machine may not have.
    export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
  fi
  cargo build --release -p simmim-worker -p simmim-coordinator --bins ${features[@]+"${features[@]}"}
  cp target/release/worker target/release/coordinator "$stage_dir/bin/"
  stage_bench simmim-model step step ${bench_features[@]+"${bench_features[@]}"}
  stage_bench simmim-model precision precision ${bench_features[@]+"${bench_features[@]}"}
  if [ "$stand_in" = 0 ]; then
    stage_bench simmim-worker nccl nccl-bench --features cuda
    # GPU_CHECK_AUTOTUNE=1: the step bench with burn-cuda's autotune too, to weigh its first-step
    # cost against its speed (another build of the cubecl crates, about 10 minutes here).
    if [ "${GPU_CHECK_AUTOTUNE:-0}" = 1 ]; then
      stage_bench simmim-model step step-autotune --features cuda,autotune
    fi
    echo cuda > "$stage_dir/MODE"
  else
    echo cpu > "$stage_dir/MODE"
  fi
  strip "$stage_dir"/bin/*
  # The carried copy is limited to 64 MiB: compress when the binaries would not fit.
  if [ "$(du -sm "$stage_dir/bin" | cut -f1)" -gt 48 ]; then
    xz -T2 -6 "$stage_dir"/bin/*
  fi
  cp ../shared/bench/torch_simmim_step.py tools/parity/simmim_reference.py \
    tools/parity/check_export.py ../shared/gpu/gpu_diag_sample.py "$stage_dir/py/"
  cp ../shared/datasets/cifar10/train.tar.gz "$stage_dir/data/"
  du -sh "$stage_dir"/* && du -sh "$stage_dir"
}

# ---- run: everything below runs on the GPU machine (or here, on stand-ins) ----

t0=$SECONDS
budget="${GPU_CHECK_BUDGET_S:-530}"
rows=()

left() { echo $((budget - (SECONDS - t0))); }
# A part's time limit: what it wants, or what is left of the budget minus a reserve for the
# parts after it; never below 1 (`timeout 0` would mean no limit). Callers skip a step whose
# limit is under 10 s.
limit() {
  local want=$1 reserve=${2:-20} have
  have=$(($(left) - reserve))
  [ "$have" -lt "$want" ] && want=$have
  [ "$want" -lt 1 ] && want=1
  echo "$want"
}
# Processes a part started, killed when the script ends however it ends.
spawned=()
cleanup() {
  for pid in ${spawned[@]+"${spawned[@]}"}; do kill -9 "$pid" 2>/dev/null || true; done
  pack_results
}
trap cleanup EXIT
# A TERM (the device tool's timeout) still runs the EXIT trap, so the logs come back.
trap 'exit 143' TERM INT
mode="" result="" packed=""
row() {
  rows+=("| $1 | $2 | $3 |")
  echo "== $1: $2 ($3)"
  write_table > /dev/null
}
# The table so far, in the work folder and in the caller's $OUT (a run cut short keeps its rows).
write_table() {
  [ -n "${OUT:-}" ] && [ -d "$OUT" ] || return 0
  {
    echo "GPU check on $(head -1 "$OUT/gpu.txt" 2>/dev/null || echo "?"), $(date -u +%FT%TZ), $((SECONDS - t0)) s, mode $mode"
    echo
    echo "| part | result | notes |"
    echo "|---|---|---|"
    printf '%s\n' ${rows[@]+"${rows[@]}"}
  } > "$OUT/gpu_check.md"
  if [ -n "$result" ] && [ "$result" != "$OUT" ]; then cp "$OUT/gpu_check.md" "$result/"; fi
  cat "$OUT/gpu_check.md"
}
# Logs, samples, metrics and the export into $OUT as one archive; not the caches, checkpoints
# or linked libraries. Python's tarfile, as the machine may have no xz.
pack_results() {
  [ -z "$packed" ] && [ -n "$result" ] && [ "$result" != "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
  packed=1
  write_table > /dev/null || true
  python3 - "$OUT" "$result/gpu_check_logs.tar.xz" <<'PY' || echo "could not archive the logs" >&2
import os, sys, tarfile
work, archive = sys.argv[1], sys.argv[2]
def keep(info):
    parts = info.name.split("/")[1:]
    if any(p in ("nv-cache", "lib", "checkpoints") or p.startswith("kernel-cache") for p in parts):
        return None
    if info.name.endswith(".memlog"):
        return None
    return None if info.issym() else info
with tarfile.open(archive, "w:xz") as tar:
    tar.add(work, arcname="out", filter=keep)
PY
  ls -la "$result" >&2 || true
}
json_field() { python3 -c "import json,sys
for line in sys.stdin:
    line=line.strip()
    if line.startswith('{'):
        v=json.loads(line).get('$1', '')
        print(f'{v:.2f}' if isinstance(v, float) else ('' if v is None else v)); break"; }

# Peak GPU memory (MiB over the baseline) while a command runs; "n/a" without nvidia-smi.
with_memory() {  # name cmd...
  local name=$1; shift
  if [ "$mode" != cuda ] || ! command -v nvidia-smi >/dev/null; then
    echo n/a > "$OUT/$name.mem"
    "$@"
    return
  fi
  local base
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | awk 'NR == 1')
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$name.memlog" &
  local sampler=$! status=0
  spawned+=("$sampler")
  "$@" || status=$?
  kill "$sampler" 2>/dev/null || true
  sort -n "$OUT/$name.memlog" | tail -1 | awk -v b="$base" '{print $1 - b}' > "$OUT/$name.mem"
  return $status
}

unpack() {
  for f in bin/*.xz; do
    [ -e "$f" ] || continue
    python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], 'wb'))" "$f"
    chmod +x "${f%.xz}"
  done
  if [ ! -d data/train ]; then
    mkdir -p data && tar xzf data/train.tar.gz -C data
  fi
}

# The first file under PyTorch's NVIDIA wheels (nvidia/<pkg>/..., nvidia/cu13/...) matching a
# path pattern, e.g. 'lib/libnccl.so*' or 'include/cuda_bf16.h'.
find_in_wheels() {  # pattern
  python3 -c "import glob, site, sys
for d in site.getsitepackages() + sys.path:
    for f in sorted(glob.glob(d + '/nvidia/**/' + sys.argv[1], recursive=True)):
        print(f); raise SystemExit" "$1" 2>/dev/null || true
}

# The first match of a file pattern in the toolkit's library folders, else in the wheels'.
find_cuda_lib() {  # pattern
  local found
  found=$(ls "$CUDA_PATH"/lib64/$1 "$CUDA_PATH"/targets/x86_64-linux/lib/$1 "$CUDA_PATH"/lib/$1 \
    2>/dev/null | head -1 || true)
  [ -n "$found" ] || found=$(find_in_wheels "lib/$1")
  echo "$found"
}

# cudarc dlopens libnvrtc.so.<major> and libnccl.so (or .so.1/.so.12), never libnccl.so.2, the
# only name NCCL's wheels ship. Put what the loader cannot find on LD_LIBRARY_PATH, and say where
# each library came from: a missing one is the first thing to read in a failed run.
cuda_libs_on_library_path() {
  [ "$mode" = cuda ] || return 0
  mkdir -p "$OUT/lib"
  local found extra="" known
  # Read once: `ldconfig -p | grep -q` can end in SIGPIPE, which pipefail reads as no match.
  known=$(ldconfig -p 2>/dev/null || true)
  # The major version the stage bound cudarc to (CUDARC_CUDA_VERSION 13000).
  if ! grep -q 'libnvrtc\.so\.13' <<<"$known"; then
    found=$(find_cuda_lib 'libnvrtc.so.13*')
    [ -n "$found" ] && extra="$(dirname "$found")"
    echo "NVRTC: ${found:-not found} (not known to ldconfig)"
  else
    echo "NVRTC: $(grep -o '/[^ ]*libnvrtc\.so\.13[^ ]*' <<<"$known" | head -1) (ldconfig)"
  fi
  if ! grep -q 'libnccl\.so ' <<<"$known"; then
    found=$(find_cuda_lib 'libnccl.so*')
    if [ -n "$found" ]; then
      ln -sf "$found" "$OUT/lib/libnccl.so"
      echo "NCCL: $found (linked as $OUT/lib/libnccl.so)"
    else
      echo "NCCL: not found"
    fi
  fi
  export LD_LIBRARY_PATH="$OUT/lib${extra:+:$extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # NVRTC compiles cubecl's kernels against $CUDA_PATH/include (cuda_bf16.h and friends).
  if [ ! -f "$CUDA_PATH/include/cuda_bf16.h" ]; then
    found=$(ls /usr/local/cuda-13*/include/cuda_bf16.h /usr/local/cuda/include/cuda_bf16.h \
      2>/dev/null | head -1 || true)
    [ -n "$found" ] || found=$(find_in_wheels 'include/cuda_bf16.h')
    if [ -n "$found" ]; then
      CUDA_PATH="$(dirname "$(dirname "$found")")"
      export CUDA_PATH
    fi
  fi
  echo "CUDA_PATH=$CUDA_PATH, headers: $(ls "$CUDA_PATH/include/cuda_bf16.h" 2>/dev/null || echo missing)"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
}

part_nccl() {
  if [ "$mode" != cuda ]; then
    row "NCCL 1-rank" "skipped" "stand-in run on the CPU"
    return
  fi
  local status=0
  timeout -k 10 "$(limit 60)" bin/nccl-bench > "$OUT/nccl.txt" 2>&1 || status=$?
  cat "$OUT/nccl.txt"
  local staged device visible
  staged=$(sed -n '/host-staged/,/on the device/p' "$OUT/nccl.txt" | grep -E '^\| 100 ' |
    awk -F'|' '{print $4}' | tr -d ' ')
  device=$(sed -n '/on the device/,$p' "$OUT/nccl.txt" | grep -E '^\| 100 ' |
    awk -F'|' '{print $4}' | tr -d ' ')
  visible=$(grep -c "visible to burn-cuda: ok" "$OUT/nccl.txt" || true)
  local scatter gather
  scatter=$(grep -E '^\| reduce-scatter ' "$OUT/nccl.txt" | awk -F'|' '{print $4}' | tr -d ' ')
  gather=$(grep -E '^\| all-gather ' "$OUT/nccl.txt" | awk -F'|' '{print $4}' | tr -d ' ')
  row "NCCL 1-rank, 100 MB" "host-staged ${staged:-?} GB/s, on device ${device:-?} GB/s, reduce-scatter ${scatter:-?} / all-gather ${gather:-?} GB/s (ZeRO-1), lent-memory writes seen: $visible" "exit $status"
}

part_first_step() {
  local kc="$OUT/kernel-cache" status
  rm -rf "$kc"
  # The kernel cache is the same folder as kernel_cache_arg's (cuda only).
  local cmd=(bin/step --backend "$backend" --model "$big_model" --img "$big_img" --window 6
    --batch "$big_batch" --json ${kernel_cache_arg[@]+"${kernel_cache_arg[@]}"})
  local before=0
  for phase in cold warm; do
    # Each part's reserve is what the parts after it need at least.
    local steps=1 warmup=0 want=130 reserve=250
    [ "$phase" = warm ] && steps=3 warmup=1 want=50 reserve=220
    local cap
    cap=$(limit $want $reserve)
    if [ "$cap" -lt 10 ]; then
      row "first step, $phase" "not run" "no time left in the budget"
      continue
    fi
    mkdir -p "$OUT/$phase"
    # The sampler counts compiles in its folder's compile.log while the step runs.
    ln -sf "$kc/compile.log" "$OUT/$phase/compile.log"
    # The sampler may spend up to 35 s on gdb backtraces after its limit.
    with_memory "first-$phase" python3 py/gpu_diag_sample.py "$OUT/$phase" "$((cap > 45 ? cap - 35 : cap))" -- \
      "${cmd[@]}" --steps "$steps" --warmup "$warmup" 2>&1 | tee "$OUT/$phase/sampler.txt" || true
    status=$(grep -o '== exit [-0-9]*' "$OUT/$phase/sampler.txt" | tail -1 | awk '{print $3}')
    # Links do not come back from the device machine: keep a copy.
    rm -f "$OUT/$phase/compile.log"
    cp "$kc/compile.log" "$OUT/$phase/compile.log" 2>/dev/null || true
    local first ips total
    first=$(json_field first_step_s < "$OUT/$phase/stdout.txt")
    ips=$(json_field images_per_s < "$OUT/$phase/stdout.txt")
    total=$(grep -c 'Compiling kernel' "$kc/compile.log" 2>/dev/null) || total=${total:-0}
    row "first step, $phase, $big_model $big_img b$big_batch f32" \
      "${first:-did not finish} s to the end of step 1$([ "$phase" = warm ] && echo ", then ${ips:-?} img/s")" \
      "kernels compiled: $((total - before)); exit ${status:-?}"
    before=$total
  done
}

part_bench() {
  local torch_device=cuda
  [ "$mode" = cuda ] || torch_device=cpu
  local common=(--model "$big_model" --img "$big_img" --window 6 --batch "$big_batch")
  # Alternating, one sitting: torch f32, burn bf16, torch bf16 (burn f32 ran in part 2).
  local status ips mem cap
  for run in "torch none" "burn bf16" "torch bf16"; do
    set -- $run
    status=0
    case "$1 $2" in
    "torch none") cap=$(limit 40 200) ;;
    "burn bf16") cap=$(limit 90 180) ;;
    *) cap=$(limit 40 150) ;;
    esac
    if [ "$cap" -lt 10 ]; then
      row "step bench $1 $2" "not run" "no time left in the budget"
      continue
    fi
    if [ "$1" = torch ]; then
      with_memory "bench-$1-$2" timeout -k 10 "$cap" python3 py/torch_simmim_step.py \
        "${common[@]}" --steps "$bench_steps" --warmup 2 --device "$torch_device" --amp "$2" \
        --json > "$OUT/bench-$1-$2.txt" 2>&1 || status=$?
    else
      with_memory "bench-$1-$2" timeout -k 10 "$cap" bin/step --backend "$backend" \
        "${common[@]}" --dtype "$2" --steps "$bench_steps" --warmup 1 --json \
        ${kernel_cache_arg[@]+"${kernel_cache_arg[@]}"} > "$OUT/bench-$1-$2.txt" 2>&1 || status=$?
    fi
    ips=$(json_field images_per_s < "$OUT/bench-$1-$2.txt")
    mem=$(cat "$OUT/bench-$1-$2.mem")
    local allocator
    allocator=$(json_field peak_gpu_mib < "$OUT/bench-$1-$2.txt")
    row "step bench $1 $2, $big_model $big_img b$big_batch" \
      "${ips:-did not finish} img/s, GPU memory +${mem} MiB" \
      "${allocator:+torch allocator peak $allocator MiB; }exit $status"
  done
}

part_cluster() {
  local run_root="$OUT/runs" port=$((20000 + RANDOM % 20000)) status=0
  rm -rf "$run_root"
  cat > "$OUT/gpu_run.yaml" <<YAML
run: {name: gpu, root: $run_root, seed: 0}
model:
  config:
    encoder: {type: swin, img_size: 32, patch_size: 2, embed_dim: 48, depths: [2, 2, 2],
              num_heads: [3, 6, 12], window_size: 4}
    mask_patch_size: 8
    mask_ratio: 0.6
data: {train: $stage_dir/data/train}
train: {epochs: 3, warmup_epochs: 0.25, micro_batch: 64, base_lr: 8.0e-3, warmup_lr: 4.0e-5,
        min_lr: 8.0e-5, max_steps: $cluster_steps}
checkpoint: {every_steps: $((cluster_steps / 6)), every_minutes: null}
output: {recon_every_steps: 0}
workers: {min: 1, max: 2, device: $worker_device, heartbeat_timeout_s: 15, last_call_s: 30,
          rejoin_timeout_s: 120}
YAML
  export SIMMIM_TOKEN="gpu-check-$RANDOM$RANDOM"
  bin/coordinator start --config "$OUT/gpu_run.yaml" --listen "127.0.0.1:$port" \
    --local-workers 0 > "$OUT/coordinator.log" 2>&1 &
  local coordinator=$!
  spawned+=("$coordinator")
  local workers=()
  for w in 0 1; do
    # A copy of part 2's cache each: kernels that do not depend on the shape are not compiled
    # again, and the two processes never write one cache.
    rm -rf "$OUT/kernel-cache-worker-$w"
    [ -d "$OUT/kernel-cache" ] && cp -r "$OUT/kernel-cache" "$OUT/kernel-cache-worker-$w"
    SIMMIM_COLLECTIVE=ring SIMMIM_WORKER_ID="gpu-check-$w" MIMALLOC_PURGE_DELAY=-1 \
      bin/worker --coordinator "http://127.0.0.1:$port" --device "$worker_device_flag" \
      --kernel-cache "$OUT/kernel-cache-worker-$w" > "$OUT/worker-$w.log" 2>&1 &
    workers+=($!)
    spawned+=($!)
  done
  local metrics="$run_root/gpu/metrics.jsonl" deadline=$((SECONDS + $(limit 200 30))) killed=""
  local half=$((cluster_steps / 2))
  while kill -0 "$coordinator" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
    if [ -z "$killed" ] && [ -f "$metrics" ] &&
      python3 -c "import json,sys
steps=[json.loads(l).get('step',0) for l in open(sys.argv[1]) if l.strip()]
sys.exit(0 if steps and max(steps) >= $half else 1)" "$metrics" 2>/dev/null; then
      kill -9 "${workers[1]}" 2>/dev/null || true
      killed="at step >= $half"
      echo "== SIGKILLed worker 1 $killed"
    fi
    sleep 1
  done
  if kill -0 "$coordinator" 2>/dev/null; then
    # Out of time: stop it (it checkpoints first), then make sure it is gone.
    kill -TERM "$coordinator" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$coordinator" 2>/dev/null || break; sleep 1; done
    kill -9 "$coordinator" 2>/dev/null || true
    status="timed out"
  else
    wait "$coordinator" || status=$?
  fi
  for pid in "${workers[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  local summary
  summary=$(python3 - "$metrics" "$OUT/coordinator.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()] if __import__("os").path.exists(sys.argv[1]) else []
losses = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
log = open(sys.argv[2]).read()
if not losses:
    print("no step recorded")
else:
    losses.sort()
    first = sum(l for _, l in losses[:10]) / len(losses[:10])
    last = sum(l for _, l in losses[-10:]) / len(losses[-10:])
    gens = sorted({r.get("generation") for r in rows if r.get("generation") is not None})
    print(f"steps {losses[0][0]}..{losses[-1][0]}, loss {first:.4f} -> {last:.4f} (first/last 10), "
          f"generations {gens}, restarts in log: {log.count('restart')}")
PY
)
  row "coordinator: 2 workers on $worker_device_flag, kill at $half of $cluster_steps" \
    "$summary" "killed ${killed:-never}; coordinator exit $status"
}

part_export() {
  local run="$OUT/runs/gpu" status=0 image
  # -quit, not `| head -1`: under pipefail a find cut off by head's SIGPIPE ends the script.
  image=$(find "$stage_dir/data/train" -name '*.jpg' -print -quit)
  {
    bin/worker export --checkpoint "$run" --format pytorch --out "$OUT/model.pth" &&
      bin/worker reconstruct --checkpoint "$run" --image "$image" --out "$OUT/recon.png" \
        --dump "$OUT/batch.safetensors" &&
      (cd py && timeout -k 10 "$(limit 60 0)" python3 check_export.py "$OUT/model.pth" "$OUT/batch.safetensors")
  } > "$OUT/export.txt" 2>&1 || status=$?
  cat "$OUT/export.txt"
  local check
  check=$(grep '^{' "$OUT/export.txt" | tail -1)
  row "export -> torch.load(weights_only=True) -> reference loss" "${check:-no result}" "exit $status"
}

# 100 steps of swin_micro in f32 and under bf16 autocast, same data and initialisation, on the
# GPU: the loss gap per 10 steps, beside the CPU's table in docs/gpu.md.
part_precision() {
  if [ ! -x bin/precision ]; then
    row "bf16 vs f32" "not run" "no precision bench staged"
    return
  fi
  local cap status=0 steps=100 batch=16 every=10 cache=()
  if [ "$mode" = cuda ]; then
    cache=(--kernel-cache "$OUT/kernel-cache")
  else
    steps=6 batch=2 every=3
  fi
  local reserve=0
  [ -x bin/step-autotune ] && reserve=60
  cap=$(limit 90 "$reserve")
  if [ "$cap" -lt 20 ]; then
    row "bf16 vs f32, swin_micro b$batch, $steps steps" "not run" "no time left in the budget"
    return
  fi
  timeout -k 10 "$cap" bin/precision --backend "$backend" --steps "$steps" --batch "$batch" \
    --every "$every" ${cache[@]+"${cache[@]}"} > "$OUT/precision.txt" 2>&1 || status=$?
  cat "$OUT/precision.txt"
  local gaps
  gaps=$(grep -E '^\| [0-9]+-[0-9]+ ' "$OUT/precision.txt" | awk -F'|' '{gsub(/ /,"",$6); printf "%s ", $6}')
  row "bf16 vs f32, swin_micro b$batch, $steps steps, relative loss gap per $every steps" \
    "${gaps:-no result}" "exit $status (limit $cap s)"
}

# Last, with what time is left: the step bench built with autotune (bf16, a cold cache of its
# own), so its first step and its speed can be set against the default build's.
part_autotune() {
  if [ ! -x bin/step-autotune ]; then
    row "step bench burn bf16 autotune" "not run" "no autotune build staged"
    return
  fi
  local cap status=0
  cap=$(limit 150 0)
  if [ "$cap" -lt 30 ]; then
    row "step bench burn bf16 autotune" "not run" "no time left in the budget"
    return
  fi
  with_memory "bench-autotune" timeout -k 10 "$cap" bin/step-autotune --backend "$backend" \
    --model "$big_model" --img "$big_img" --window 6 --batch "$big_batch" --dtype bf16 \
    --steps 3 --warmup 1 --json ${kernel_cache_arg[@]+--kernel-cache "$OUT/kernel-cache-autotune"} \
    > "$OUT/bench-autotune.txt" 2>&1 || status=$?
  local first ips
  first=$(json_field first_step_s < "$OUT/bench-autotune.txt")
  ips=$(json_field images_per_s < "$OUT/bench-autotune.txt")
  row "step bench burn bf16 autotune, $big_model $big_img b$big_batch, cold cache" \
    "${first:-did not finish} s to the end of step 1, then ${ips:-?} img/s, GPU memory +$(cat "$OUT/bench-autotune.mem") MiB" \
    "exit $status (limit $cap s)"
}

run() {
  cd "$stage_dir"
  # The parts write logs, caches and checkpoints into a work folder; the caller's $OUT gets the
  # table and one archive of the logs (the device tool returns at most 8 files, 2 folders deep).
  result="${OUT:-}" mode=$(cat MODE)
  OUT="${GPU_CHECK_WORK:-$stage_dir/out}"
  rm -rf "$OUT" && mkdir -p "$OUT"
  OUT="$(cd "$OUT" && pwd)"
  [ -n "$result" ] && mkdir -p "$result" && result="$(cd "$result" && pwd)"
  export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
  # The driver's PTX->SASS cache where it can be sized, not in a home that may not persist.
  export CUDA_CACHE_PATH="$OUT/nv-cache" CUDA_CACHE_MAXSIZE=4294967296
  unset CUBECL_DEBUG_LOG CUBECL_DEBUG_OPTION
  unpack
  # Not in a pipe: the function exports LD_LIBRARY_PATH and CUDA_PATH for the parts.
  cuda_libs_on_library_path > "$OUT/libs.txt" 2>&1 || echo "library lookup failed" >> "$OUT/libs.txt"
  cat "$OUT/libs.txt"
  if [ "$mode" = cuda ]; then
    backend=cuda big_model=swin_base big_img=192 big_batch=64 bench_steps=10
    cluster_steps="${GPU_CHECK_STEPS:-300}" worker_device=cuda worker_device_flag=cuda:0
    kernel_cache_arg=(--kernel-cache "$OUT/kernel-cache")
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  else
    backend=flex big_model=swin_micro big_img=48 big_batch=8 bench_steps=2
    cluster_steps="${GPU_CHECK_STEPS:-60}" worker_device=cpu worker_device_flag=cpu
    kernel_cache_arg=()
    echo "CPU stand-in, $(nproc) cores" > "$OUT/gpu.txt"
  fi
  { python3 -c "import torch; print('torch', torch.__version__)" 2>&1 || true; } | tail -1 | tee -a "$OUT/gpu.txt"
  for part in part_nccl part_first_step part_bench part_cluster part_export part_precision part_autotune; do
    if [ "$(left)" -lt 30 ]; then
      row "${part#part_}" "not run" "the $budget s budget was spent"
      continue
    fi
    "$part" || row "${part#part_}" "failed" "see gpu_check_logs.tar.xz"
  done
  pack_results
  write_table
}

case "${1:-}" in
stage) shift; stage "$@" ;;
run) run ;;
*)
  echo "usage: $0 stage [--stand-in] | run" >&2
  exit 2
  ;;
esac
