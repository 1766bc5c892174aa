#!/usr/bin/env bash
# The SimMIM paper's ablations at CIFAR-10 scale: every variant in variants/ (a few lines
# under model.config: mask strategy, mask patch, ratio, head, loss kind, area, target
# resolution, target normalisation) is pretrained for
# the same budget from base.yaml, then scored by a linear probe on its frozen features and a
# short fine-tune with 10% of the labels. One table at the end:
#   variant | AvgDist | s/step | final loss | probe top-1 | fine-tune top-1
#
# experiments/ablations/run.sh [VARIANT ...]      (default: every variant; re-running skips
#                                                 what is done, so an interrupted run goes on)
# STEPS (pretraining steps, default 300), FT_STEPS (fine-tuning steps, default 200),
# PROBE_TRAIN / PROBE_TEST (probe images, default 5000 / 2000).
# SMOKE=1: three variants, a few steps each, a 10-per-class test subset, under
# runs/ablations-smoke; fails unless every variant has a row (scripts/test.sh runs it).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
source experiments/lib/test-subset.sh
here=experiments/ablations
bin="${SIMMIM_BIN:-target/release}"
steps="${STEPS:-300}"
ft_steps="${FT_STEPS:-200}"
probe_train="${PROBE_TRAIN:-5000}"
probe_test="${PROBE_TEST:-2000}"
out=runs/ablations
test_set=./data/cifar10/test
variants=("$@")
if [[ -n "${SMOKE:-}" ]]; then
  out=runs/ablations-smoke
  steps=6
  ft_steps=4
  probe_train=200
  probe_test=100
  [[ ${#variants[@]} == 0 ]] && variants=(base block mlp_head)
fi
if [[ ${#variants[@]} == 0 ]]; then
  for file in "$here"/variants/*.yaml; do
    variants+=("$(basename "$file" .yaml)")
  done
fi
if [[ -z "${SIMMIM_BIN:-}" ]]; then
  scripts/setup.sh
  cargo build --release --workspace --bins
fi
mkdir -p "$out"

if [[ -n "${SMOKE:-}" ]]; then
  # Ten test images per class (links), so the smoke run's evaluations take seconds.
  test_set="$out/test-subset"
  test_subset "$test_set" 10
fi

# The variant's lines, indented under model.config.
variant_lines() {
  grep -v '^#' "$here/variants/$1.yaml" | sed 's/^/    /' || true
}

pretrain_config() {
  local name=$1 config="$out/$1/pretrain.yaml"
  mkdir -p "$out/$name"
  sed -e "s|^  name: NAME|  name: pretrain|" -e "s|^  root: ROOT|  root: ./$out/$name|" \
    -e "s|^  max_steps: STEPS|  max_steps: $steps|" "$here/base.yaml" \
    | awk -v extra="$(variant_lines "$name")" \
      '{ print } /^    mask_ratio:/ && extra != "" { print extra }' > "$config"
  echo "$config"
}

finetune_config() {
  local name=$1 config="$out/$1/finetune.yaml"
  cat > "$config" <<YAML
run:
  name: finetune
  root: ./$out/$name
  seed: 0
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
  labels_per_class: 500
  subset_seed: 0
train:
  epochs: 7.7
  warmup_epochs: 0.5
  micro_batch: 64
  base_lr: 5.0e-3
  warmup_lr: 1.0e-6
  min_lr: 1.0e-6
  max_steps: $ft_steps
finetune:
  pretrained: ./$out/$name/pretrain
  layer_decay: 0.9
  label_smoothing: 0.1
  crop_scale: [0.35, 1.0]
  test_crop_pct: null
  eval_every_epochs: 100
checkpoint:
  every_steps: 100000
  every_minutes: null
output:
  recon_every_steps: 0
YAML
  echo "$config"
}

for name in "${variants[@]}"; do
  [[ -f "$here/variants/$name.yaml" ]] || { echo "no variant $here/variants/$name.yaml" >&2; exit 2; }
  dir="$out/$name"
  config=$(pretrain_config "$name")
  if [[ ! -f "$dir/mask_stats.txt" ]]; then
    "$bin/worker" mask-stats --config "$config" --samples 64 > "$dir/mask_stats.txt"
  fi
  if [[ ! -f "$dir/pretrain.done" ]]; then
    echo "== $name: pretraining $steps steps"
    "$bin/coordinator" start --config "$config"
    touch "$dir/pretrain.done"
  fi
  if [[ ! -f "$dir/probe.json" ]]; then
    echo "== $name: linear probe"
    "$bin/worker" probe --weights "$dir/pretrain" --train ./data/cifar10/train --test "$test_set" \
      --train-limit "$probe_train" --test-limit "$probe_test" --json > "$dir/probe.json.partial"
    mv "$dir/probe.json.partial" "$dir/probe.json"
  fi
  if [[ ! -f "$dir/finetune/best/best.json" ]]; then
    echo "== $name: fine-tuning $ft_steps steps, 10% of the labels"
    "$bin/coordinator" start --config "$(finetune_config "$name")"
  fi
done

python3 "$here/summary.py" "$out" "${variants[@]}" ${SMOKE:+--require ${#variants[@]}}
