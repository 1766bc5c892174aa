"""Summarises the CIFAR-10 fine-tuning runs of experiments/cifar10/run.sh: a Markdown table of
test top-1 per run and per arm, and (when matplotlib is installed) the learning curves.

python3 experiments/cifar10/summary.py runs/cifar10-ft [--plot docs/images/cifar10-finetune.png] [--require N]
python3 experiments/cifar10/summary.py --best scratch|pre runs/cifar10-ft 10pct   (prints an LR)
Standard library only, except for the plot.
"""
import json
import os
import re
import statistics
import sys

NAME = re.compile(r"^(pre|scratch)-(\d+pct)(?:-lr([0-9.e+-]+))?-s(\d+)$")


def runs(root):
    for name in sorted(os.listdir(root)):
        m = NAME.match(name)
        metrics = os.path.join(root, name, "metrics.jsonl")
        if not m or not os.path.exists(metrics):
            continue
        evals, steps = [], 0
        with open(metrics) as f:
            for line in f:
                row = json.loads(line)
                steps = max(steps, row["step"])
                if "eval_top1" in row:
                    evals.append((row["step"], row["eval_top1"], row["eval_top5"]))
        if not evals:
            continue
        wall = None
        wall_file = os.path.join(root, name, "wall_seconds")
        if os.path.exists(wall_file):
            wall = int(open(wall_file).read().strip())
        yield {
            "name": name,
            "arm": m.group(1),
            "labels": m.group(2),
            "lr": m.group(3) or "5.0e-3",
            "seed": int(m.group(4)),
            "steps": steps,
            "evals": evals,
            "final": evals[-1][1],
            "final5": evals[-1][2],
            "best": max(e[1] for e in evals),
            "wall": wall,
        }


def best_lr(all_runs, arm, labels):
    """The arm's learning rate with the highest final top-1 at seed 0."""
    runs_ = [r for r in all_runs if r["arm"] == arm and r["labels"] == labels and r["seed"] == 0]
    return max(runs_, key=lambda r: r["final"])["lr"] if runs_ else "5.0e-3"


def main(argv):
    if argv and argv[0] == "--best":
        print(best_lr(list(runs(argv[2])), argv[1], argv[3]))
        return
    root = argv[0] if argv else "runs/cifar10-ft"
    plot = argv[argv.index("--plot") + 1] if "--plot" in argv else None
    required = int(argv[argv.index("--require") + 1]) if "--require" in argv else 0
    all_runs = list(runs(root))
    if len(all_runs) < required:
        print(f"only {len(all_runs)} evaluated runs in {root}, expected {required}", file=sys.stderr)
        sys.exit(1)
    print("| run | labels | LR (per 512) | seed | steps | final top-1 | best top-1 | final top-5 | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in all_runs:
        wall = f"{r['wall'] / 60:.1f} min" if r["wall"] else "-"
        print(f"| {r['name']} | {r['labels']} | {r['lr']} | {r['seed']} | {r['steps']} | "
              f"{100 * r['final']:.2f}% | {100 * r['best']:.2f}% | {100 * r['final5']:.2f}% | {wall} |")
    print()
    for labels in sorted({r["labels"] for r in all_runs}):
        arms = {}
        for arm in ("pre", "scratch"):
            lr = best_lr(all_runs, arm, labels)
            arms[arm] = (lr, [r["final"] for r in all_runs
                              if r["arm"] == arm and r["labels"] == labels and r["lr"] == lr])
        (pre_lr, pre), (scratch_lr, scratch) = arms["pre"], arms["scratch"]
        if pre and scratch:
            gap = statistics.mean(pre) - statistics.mean(scratch)
            print(f"{labels}: pretrained (LR {pre_lr}) {100 * statistics.mean(pre):.2f}% (n={len(pre)}) vs "
                  f"scratch (LR {scratch_lr}) {100 * statistics.mean(scratch):.2f}% (n={len(scratch)}): "
                  f"{100 * gap:+.2f} points (means over seeds, each arm at its best seed-0 LR)")
    if plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
            return
        panels = sorted({r["labels"] for r in all_runs}, key=lambda s: -int(s[:-3]))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, labels in zip(axes[0], panels):
            for r in all_runs:
                if r["labels"] != labels:
                    continue
                steps = [e[0] for e in r["evals"]]
                top1 = [100 * e[1] for e in r["evals"]]
                style = "-" if r["arm"] == "pre" else "--"
                label = f"{r['arm']} lr {r['lr']} s{r['seed']}"
                ax.plot(steps, top1, style, marker="o", markersize=3, label=label)
            ax.set_title(f"CIFAR-10, {labels} of the labels")
            ax.set_xlabel("fine-tuning step")
            ax.set_ylabel("test top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"wrote {plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
