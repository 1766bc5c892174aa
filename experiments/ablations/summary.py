"""The ablation runner's table (experiments/ablations/run.sh): one row per variant.

python3 experiments/ablations/summary.py runs/ablations [VARIANT ...] [--require N]

variant | AvgDist (px) | masked | s/step | final loss | probe top-1 | fine-tune top-1
- AvgDist and the true masked share: `worker mask-stats` on the variant's config (64 masks);
- s/step: the median pretraining step time after the first five steps;
- final loss: the mean of the last tenth of the pretraining steps (losses of different kinds
  or areas are not on one scale);
- probe top-1: `worker probe`'s linear probe on the frozen, pooled features;
- fine-tune top-1: the best test top-1 of the short fine-tune with 10% of the labels.
Standard library only.
"""
import json
import os
import re
import statistics
import sys


def read_metrics(path):
    by_step = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def row(out, name):
    d = os.path.join(out, name)
    text = open(os.path.join(d, "mask_stats.txt")).read()
    avg = re.search(r"AvgDist ([0-9.]+|NaN) px", text)
    masked = re.search(r"([0-9.]+) masked on average", text)
    metrics = read_metrics(os.path.join(d, "pretrain", "metrics.jsonl"))
    steady = [m["step_seconds"] for m in metrics[5:]] or [m["step_seconds"] for m in metrics]
    tail = metrics[-max(1, len(metrics) // 10):]
    probe = json.load(open(os.path.join(d, "probe.json")))
    best = json.load(open(os.path.join(d, "finetune", "best", "best.json")))
    return {
        "variant": name,
        "avg_dist": avg.group(1) if avg else "?",
        "masked": masked.group(1) if masked else "?",
        "step": statistics.median(steady),
        "loss": statistics.mean(m["loss"] for m in tail),
        "steps": metrics[-1]["step"],
        "probe": 100.0 * probe["linear_top1"],
        "finetune": 100.0 * best["top1"],
    }


def main(argv):
    require = None
    if "--require" in argv:
        i = argv.index("--require")
        require = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    out, names = argv[0], argv[1:]
    if not names:
        names = sorted(n for n in os.listdir(out) if os.path.isdir(os.path.join(out, n, "pretrain")))
    rows, missing = [], []
    for name in names:
        try:
            rows.append(row(out, name))
        except (OSError, KeyError, ValueError) as e:
            missing.append(f"{name}: {e}")
    print("| variant | AvgDist (px) | masked | s/step | final loss | probe top-1 | fine-tune top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['avg_dist']} | {r['masked']} | {r['step']:.3f} | "
            f"{r['loss']:.4f} | {r['probe']:.2f}% | {r['finetune']:.2f}% |"
        )
    for m in missing:
        print(f"(no row: {m})", file=sys.stderr)
    if require is not None and len(rows) < require:
        print(f"only {len(rows)} of {require} variants have a row", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
