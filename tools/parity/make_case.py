"""Make or check SimMIM parity cases in the format of ../shared/fixtures/parity/README.md.

    python make_case.py check ../../../shared/fixtures/parity/*.safetensors
    python make_case.py make OUT.safetensors '{"type": "swin", ...}' [--seed N]

`check` rebuilds each case with this reference and reports its deviation from the stored
expectations (proof that this reference is the one the fixtures came from); `make` writes a
new case with the same fields, so the Rust parity test can run configurations beyond the
shared ones (SIMMIM_PARITY_DIR=DIR)."""
import json
import math
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from simmim_reference import SimMIM, param_groups

torch.set_default_dtype(torch.float64)

TRAIN = {"steps": 3, "lr": 0.002, "betas": [0.9, 0.999], "eps": 1e-08,
         "weight_decay": 0.05, "clip_grad": 5.0}
NO_WD = ("1-D params, *.bias, relative_position_bias_table, absolute_pos_embed, pos_embed, "
         "cls_token, mask_token")


def run(model, x, mask, train):
    model.zero_grad()
    loss, rec = model(x, mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model)
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=train["lr"], betas=tuple(train["betas"]), eps=train["eps"],
                            weight_decay=train["weight_decay"])
    losses = []
    for _ in range(train["steps"]):
        opt.zero_grad()
        l, _ = model(x, mask)
        losses.append(l.item())
        l.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train["clip_grad"])
        opt.step()
    return loss.item(), rec.detach(), grads, losses


def check(path):
    import safetensors
    with safetensors.safe_open(path, "pt") as f:
        case = json.loads(f.metadata()["case"])
    t = load_file(path)
    model = SimMIM(case)
    state = {k: v for k, v in t.items() if not k.startswith("expected.") and k not in ("input", "mask")}
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=True)
    loss, rec, grads, losses = run(model, t["input"].double(), t["mask"].long(), case["train"])
    want = t["expected.loss"].item()
    print(f"{path}: loss {loss:.7f} vs {want:.7f}; "
          f"rec max err {(rec - t['expected.reconstruction']).abs().max().item():.2e}; "
          f"worst grad rel err {max((grads[n] - t['expected.grad.' + n]).norm() / t['expected.grad.' + n].norm() for n in grads):.2e}; "
          f"train {[round(l, 7) for l in losses]} vs {t['expected.train_losses'].tolist()}")


def mask_for(case, rng):
    units = case["img_size"] // case["mask_patch_size"]
    scale = case["mask_patch_size"] // case["patch_size"]
    count = int(math.ceil(units * units * case["mask_ratio"]))
    masks = []
    for _ in range(case["batch"]):
        m = np.zeros(units * units, dtype=np.uint8)
        m[rng.permutation(units * units)[:count]] = 1
        m = m.reshape(units, units).repeat(scale, 0).repeat(scale, 1)
        masks.append(m)
    return torch.from_numpy(np.stack(masks))


def make(out, case, seed):
    case = dict(case)
    case.setdefault("batch", 2)
    case.setdefault("mask_ratio", 0.6)
    case.setdefault("mlp_ratio", 4.0)
    case.setdefault("qkv_bias", True)
    case.setdefault("train", TRAIN)
    case.setdefault("no_weight_decay", NO_WD)
    if case["type"] in ("swin", "swinv2"):
        case.setdefault("encoder_stride", case["patch_size"] * 2 ** (len(case["depths"]) - 1))
    else:
        case.setdefault("encoder_stride", case["patch_size"])
    torch.manual_seed(seed)
    model = SimMIM(case)
    with torch.no_grad():  # non-trivial decoder and norms, so every path carries signal
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(case["batch"], 3, case["img_size"], case["img_size"])
    mask = mask_for(case, np.random.default_rng(seed))
    # Round weights and input to f32 first: the stored case is f32, the math is f64.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.float().double())
    x = x.float().double()
    state = {k: (v.float() if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    loss, rec, grads, losses = run(model, x, mask.long(), case["train"])
    tensors = dict(state)
    tensors["input"] = x.float()
    tensors["mask"] = mask.to(torch.uint8)
    tensors["expected.loss"] = torch.tensor([loss], dtype=torch.float32)
    tensors["expected.reconstruction"] = rec.float().contiguous()
    tensors["expected.train_losses"] = torch.tensor(losses, dtype=torch.float32)
    for n, g in grads.items():
        tensors["expected.grad." + n] = g.float().contiguous()
    save_file(tensors, out, metadata={"case": json.dumps(case)})
    print(f"{out}: loss {loss:.6f}, {len(grads)} grads, train {losses}")


if __name__ == "__main__":
    if sys.argv[1] == "check":
        for p in sys.argv[2:]:
            check(p)
    elif sys.argv[1] == "make":
        seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
        make(sys.argv[2], json.loads(sys.argv[3]), seed)
