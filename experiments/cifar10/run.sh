#!/usr/bin/env bash
# The CIFAR-10 experiment of the README: does SimMIM pretraining make a better encoder for
# fine-tuning with few labels, with this project?
#
#   1. pretrain the small Swin of pretrain.yaml with SimMIM on the 50,000 train images
#      (labels unused)                                   -> runs/cifar10-pretrain
#   2. fine-tune it on 10% of the labels (500 per class) and on 1% (50 per class), subsets
#      drawn with a fixed seed                           -> runs/cifar10-ft/pre-*
#   3. the same architecture from scratch with the same steps, at three learning rates
#      (its best one is the baseline)                    -> runs/cifar10-ft/scratch-*
#   4. a table of test top-1 (full 10,000-image test set) and the learning-curve plot
#
# experiments/cifar10/run.sh [all|pretrain|finetune|scratch|pretrained|seeds|summary]   (default all; each step resumes
# or skips what is already done, so re-running after an interruption continues)
# SEEDS="0 1" sets the fine-tuning seeds of the 10% arms (default "0 1").
# SMOKE=1 runs every stage scaled down (16 pretraining steps, 8 and 4 fine-tuning steps) under
# runs/cifar10-smoke and fails unless every run was evaluated: scripts/test.sh runs it.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
source experiments/lib/test-subset.sh
stage="${1:-all}"
bin="${SIMMIM_BIN:-target/release}"
seeds="${SEEDS:-0 1}"
out=runs/cifar10-ft
test_set=./data/cifar10/test
pre_run=./runs/cifar10-pretrain
steps10=600
steps1=300
summary_args=(--plot docs/images/cifar10-finetune.png)
if [[ -n "${SMOKE:-}" ]]; then
  out=runs/cifar10-smoke/ft
  pre_run=./runs/cifar10-smoke/pretrain
  steps10=8
  steps1=4
  summary_args=(--require 10)
  # Twenty test images per class: the smoke run proves every arm is evaluated, not its score.
  test_set=./runs/cifar10-smoke/test-subset
fi

if [[ -z "${SIMMIM_BIN:-}" ]]; then
  scripts/setup.sh
  cargo build --release --workspace --bins
fi
if [[ -n "${SMOKE:-}" ]]; then test_subset "$test_set" 20; fi

pretrain() {
  if [[ -n "${SMOKE:-}" ]]; then
    mkdir -p runs/cifar10-smoke
    sed -e 's/^  name: cifar10-pretrain/  name: pretrain/' -e 's|^  root: ./runs|  root: ./runs/cifar10-smoke|' \
      experiments/cifar10/pretrain.yaml > runs/cifar10-smoke/pretrain.yaml
    "$bin/coordinator" start --config runs/cifar10-smoke/pretrain.yaml --max-steps 16
  else
    "$bin/coordinator" start --config experiments/cifar10/pretrain.yaml
  fi
}

# finetune NAME PRETRAINED(or "") LABELS_PER_CLASS MICRO_BATCH BASE_LR STEPS EPOCHS EVAL_EVERY SEED
finetune() {
  local name=$1 pretrained=$2 per_class=$3 batch=$4 lr=$5 steps=$6 epochs=$7 every=$8 seed=$9
  if [[ -f "$out/$name/best/best.json" && -f "$out/$name/latest" ]]; then
    echo "== $name: done already ($(tr -d ' \n' < "$out/$name/best/best.json"))"
    return
  fi
  mkdir -p "$out/configs"
  local config="$out/configs/$name.yaml"
  cat > "$config" <<YAML
run:
  name: $name
  root: ./$out
  seed: $seed
model:
  config:
    encoder:
      type: swin
      img_size: 32
      patch_size: 2
      embed_dim: 48
      depths: [2, 2, 2]
      num_heads: [3, 6, 12]
      window_size: 4
      drop_path_rate: 0.1
    mask_patch_size: 4
    mask_ratio: 0.6
data:
  train: ./data/cifar10/train
  test: $test_set
  labels_per_class: $per_class
  subset_seed: 0
train:
  epochs: $epochs
  warmup_epochs: 0.5
  micro_batch: $batch
  base_lr: $lr
  warmup_lr: 1.0e-6
  min_lr: 1.0e-6
  max_steps: $steps
finetune:
  ${pretrained:+pretrained: $pretrained}
  layer_decay: $( [[ -n "$pretrained" ]] && echo 0.9 || echo 1.0 )
  label_smoothing: 0.1
  crop_scale: [0.35, 1.0]
  test_crop_pct: null
  eval_every_epochs: $every
checkpoint:
  every_steps: 100000
  every_minutes: null
output:
  recon_every_steps: 0
YAML
  echo "== $name"
  local started=$SECONDS
  "$bin/coordinator" start --config "$config"
  echo "$((SECONDS - started))" > "$out/$name/wall_seconds"
}

scratch_arms() {
  # 10% labels: 5,000 images, batch 64 (78 steps an epoch), 600 steps.
  for lr in 2.5e-3 5.0e-3 1.0e-2; do
    finetune "scratch-10pct-lr$lr-s0" "" 500 64 "$lr" "$steps10" 7.7 1 0
  done
  # 1% labels: 500 images, batch 50 (10 steps an epoch), 300 steps.
  for lr in 2.5e-3 5.0e-3 1.0e-2; do
    finetune "scratch-1pct-lr$lr-s0" "" 50 50 "$lr" "$steps1" 30 10 0
  done
}

pretrained_arms() {
  local pre=$pre_run
  # One learning rate (5e-3 per 512, with layer decay 0.9), untuned; the scratch baseline
  # gets the best of three.
  finetune "pre-10pct-lr5.0e-3-s0" "$pre" 500 64 5.0e-3 "$steps10" 7.7 1 0
  finetune "pre-1pct-lr5.0e-3-s0" "$pre" 50 50 5.0e-3 "$steps1" 30 10 0
}

# Each arm's best learning rate at 10% again with the other seeds.
scratch_seeds() {
  local pre=$pre_run best
  for seed in $seeds; do
    [[ "$seed" == 0 ]] && continue
    best=$(python3 experiments/cifar10/summary.py --best scratch "$out" 10pct)
    finetune "scratch-10pct-lr$best-s$seed" "" 500 64 "$best" "$steps10" 7.7 1 "$seed"
    best=$(python3 experiments/cifar10/summary.py --best pre "$out" 10pct)
    finetune "pre-10pct-lr$best-s$seed" "$pre" 500 64 "$best" "$steps10" 7.7 1 "$seed"
  done
}

finetune_all() {
  scratch_arms
  pretrained_arms
  scratch_seeds
}

case "$stage" in
  pretrain) pretrain ;;
  finetune) finetune_all ;;
  scratch) scratch_arms ;;
  pretrained) pretrained_arms ;;
  seeds) scratch_seeds ;;
  summary) python3 experiments/cifar10/summary.py "$out" "${summary_args[@]}" ;;
  all) pretrain; finetune_all; python3 experiments/cifar10/summary.py "$out" "${summary_args[@]}" ;;
  *) echo "usage: $0 [all|pretrain|finetune|scratch|pretrained|seeds|summary]" >&2; exit 2 ;;
esac
