"""PyTorch's own gap between bf16 autocast and f32, on the setup of
`cargo bench -p simmim-model --bench precision` (swin_micro, the official model from
tools/parity/simmim_reference.py, smooth random images, random masks, AdamW lr 1e-3, the
same initialisation for both runs), to read the Rust table against:

    .venv-torchref/bin/python tools/bench/torch_precision.py --steps 100 --batch 16
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from simmim_reference import SimMIM  # noqa: E402

SWIN_MICRO = {"type": "swin", "img_size": 64, "patch_size": 2, "embed_dim": 48,
              "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 4,
              "mlp_ratio": 4.0, "qkv_bias": True, "ape": False, "patch_norm": True,
              "encoder_stride": 16}


def batch(step, size, img, mask_patch=8, patch=2, ratio=0.6):
    rng = np.random.default_rng(step)
    y, x = np.mgrid[0:img, 0:img].astype(np.float32)
    images = np.empty((size, 3, img, img), np.float32)
    for b in range(size):
        for c in range(3):
            fx, fy = rng.uniform(0.05, 0.4, 2)
            phase, amp = rng.uniform(0, 6.3), rng.uniform(0.5, 1.5)
            images[b, c] = amp * (np.sin(x * fx + phase) + np.cos(y * fy)) * 0.7
    units, scale = img // mask_patch, mask_patch // patch
    count = int(math.ceil(units * units * ratio))
    masks = []
    for _ in range(size):
        m = np.zeros(units * units, np.int64)
        m[rng.permutation(units * units)[:count]] = 1
        masks.append(m.reshape(units, units).repeat(scale, 0).repeat(scale, 1))
    return torch.from_numpy(images), torch.from_numpy(np.stack(masks))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grad-errors", action="store_true",
                    help="each parameter's relative gradient error, bf16 against f32, "
                         "on the first batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.grad_errors:
        model = SimMIM(SWIN_MICRO)
        x, mask = batch(0, args.batch, SWIN_MICRO["img_size"])
        grads = []
        for enabled in (False, True):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss, _ = model(x, mask)
            loss.float().backward()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        errors = sorted(((n, ((grads[1][n] - g).norm() / g.norm()).item())
                         for n, g in grads[0].items() if g.norm() > 0), key=lambda e: -e[1])
        print(f"{len(errors)} parameters; median relative gradient error "
              f"{errors[len(errors) // 2][1]:.2e}")
        print("| parameter | relative error |")
        print("|---|---|")
        for name, error in errors[:15]:
            print(f"| {name} | {error:.2e} |")
        return
    models = [SimMIM(SWIN_MICRO), SimMIM(SWIN_MICRO)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.05)
                  for m in models]
    losses = []
    for step in range(args.steps):
        x, mask = batch(step, args.batch, SWIN_MICRO["img_size"])
        pair = []
        for i, (model, opt) in enumerate(zip(models, optimizers)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(i == 1)):
                loss, _ = model(x, mask)
            loss.float().backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    print(f"PyTorch {torch.__version__}, swin_micro batch {args.batch}, lr {args.lr}: "
          f"mean loss per {args.every} steps")
    print("| steps | f32 | bf16 autocast | gap | relative gap |")
    print("|---|---|---|---|---|")
    for start in range(0, len(losses), args.every):
        rows = np.array(losses[start:start + args.every])
        a, b = rows[:, 0].mean(), rows[:, 1].mean()
        print(f"| {start + 1}-{start + len(rows)} | {a:.5f} | {b:.5f} | {b - a:+.5f} | "
              f"{100 * abs(b - a) / a:.3f}% |")


if __name__ == "__main__":
    main()
