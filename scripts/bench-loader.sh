#!/usr/bin/env bash
# The data loader against what users run today (torchvision ImageFolder + the official SimMIM
# transform and mask generator in a torch DataLoader), on the same files with the same number
# of decoding threads / worker processes, alternating, ROUNDS times (default 2):
#   - the shared photos (ImageNet-size JPEGs) at 192 px;
#   - an ImageFolder of 224 px JPEGs (made once from the photos, 200 files) at 224 px.
# Needs the reference's venv: python3 -m venv .venv-torchref && .venv-torchref/bin/pip install torch torchvision timm
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds="${ROUNDS:-2}" seconds="${SECONDS_PER_RUN:-8}"
py="${TORCH_PYTHON:-$root/.venv-torchref/bin/python}"
data="$root/target/bench-data"
photos="$data/photos-192" folder224="$data/jpeg-224"
if [ ! -d "$photos/photos" ]; then
  mkdir -p "$photos/photos" && cp ../shared/datasets/photos/*.jpg "$photos/photos/"
fi
if [ ! -d "$folder224/b" ]; then
  "$py" - "$root/../shared/datasets/photos" "$folder224" <<'PY'
import os, random, sys
from PIL import Image
src, out = sys.argv[1], sys.argv[2]
rng = random.Random(0)
photos = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".jpg"))
for i in range(200):
    img = Image.open(photos[i % len(photos)]).convert("RGB")
    w, h = img.size
    side = rng.randint(min(w, h) // 2, min(w, h))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    crop = img.crop((x, y, x + side, y + side)).resize((224, 224), Image.BICUBIC)
    folder = os.path.join(out, "ab"[i % 2])
    os.makedirs(folder, exist_ok=True)
    crop.save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
PY
fi
export MIMALLOC_PURGE_DELAY=-1
bin=$(cargo bench -p simmim-worker --bench data --no-run 2>&1 |
  grep -o 'target/release/deps/data-[0-9a-f]*' | tail -1)
out=$(mktemp)
for ((r = 0; r < rounds; r++)); do
  for case in "$photos 192" "$folder224 224"; do
    set -- $case
    for threads in 1 2; do
      "$bin" --folder "$1" --size "$2" --threads "$threads" --seconds "$seconds" | tee -a "$out"
      "$py" tools/bench/torch_loader.py --root "$1" --size "$2" --workers "$threads" --seconds "$seconds" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("\n| files | px | threads / workers | torchvision img/s | simmim-rs img/s | ratio |")
print("|---|---|---|---|---|---|")
for size, label in ((192, "shared photos (ImageNet-size JPEG)"), (224, "224 px JPEGs")):
    for threads in (1, 2):
        pick = lambda impl: statistics.median(r["images_per_s"] for r in runs
                                              if r["impl"] == impl and r["size"] == size and r["threads"] == threads)
        t, o = pick("torchvision"), pick("simmim-rs")
        print(f"| {label} | {size} | {threads} | {t:.0f} | {o:.0f} | {o / t:.2f}x |")
PY
