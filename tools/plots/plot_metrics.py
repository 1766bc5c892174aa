"""Plots a run's metrics.jsonl (loss, learning rate, throughput) into one PNG.

    python tools/plots/plot_metrics.py runs/demo/metrics.jsonl docs/images/demo-loss.png

Lines from a restarted generation repeat steps; the last value written for a step wins.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    by_step = {}
    with open(src) as f:
        for line in f:
            m = json.loads(line)
            by_step[m["step"]] = m
    steps = sorted(by_step)
    loss = [by_step[s]["loss"] for s in steps]
    lr = [by_step[s]["lr"] for s in steps]
    ips = [by_step[s]["images_per_sec"] for s in steps]
    window = 25
    smooth = [sum(loss[max(0, i - window + 1): i + 1]) / len(loss[max(0, i - window + 1): i + 1]) for i in range(len(loss))]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(steps, loss, alpha=0.3, label="per step")
    axes[0].plot(steps, smooth, label=f"mean of {window}")
    axes[0].set_title("masked L1 loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot(steps, lr)
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    axes[2].plot(steps, ips)
    axes[2].set_title("images / s")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(dst, dpi=90)
    print(f"wrote {dst}: {len(steps)} steps, loss {loss[0]:.3f} -> {smooth[-1]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
