"""Check SwinV2 parity cases against the official module itself, not this folder's reference.

    python check_official.py SWIN_TRANSFORMER_CHECKOUT CASE.safetensors [...] [--pth]

SWIN_TRANSFORMER_CHECKOUT is a checkout of microsoft/Swin-Transformer (its models/ folder is
imported, nothing is copied here). Each `swinv2` case is rebuilt as the official
`SimMIM(SwinTransformerV2ForSimMIM)`, loaded strictly with the case's tensors (parameters and
buffers under the official keys), and its loss, reconstruction and every gradient are compared
with the case's expectations: proof that the reference that made the case is the official
math. `--pth` also saves the official model's state as an official checkpoint does
(`torch.save({"model": state_dict})`, f32) beside each case as `CASE.official.pth`, for the
Rust side's `.pth` loading test. timm is only needed for three helpers; without it a stand-in is used (dropout and drop
path are 0 in the cases)."""
import collections.abc
import importlib
import json
import sys
import types

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

torch.set_default_dtype(torch.float64)


def timm_stand_in():
    try:
        import timm.models.layers  # noqa: F401
        return
    except ImportError:
        pass
    layers = types.ModuleType("timm.models.layers")
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)
    layers.trunc_normal_ = lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0: nn.init.trunc_normal_(
        t, mean=mean, std=std, a=a, b=b)

    class DropPath(nn.Module):
        def __init__(self, p=0.0):
            super().__init__()

        def forward(self, x):
            return x

    layers.DropPath = DropPath
    for name, module in (("timm", types.ModuleType("timm")),
                         ("timm.models", types.ModuleType("timm.models")),
                         ("timm.models.layers", layers)):
        sys.modules[name] = module


def official_model(checkout, case):
    sys.path.insert(0, checkout)
    timm_stand_in()
    simmim = importlib.import_module("models.simmim")
    encoder = simmim.SwinTransformerV2ForSimMIM(
        img_size=case["img_size"], patch_size=case["patch_size"], in_chans=3, num_classes=0,
        embed_dim=case["embed_dim"], depths=case["depths"], num_heads=case["num_heads"],
        window_size=case["window_size"], mlp_ratio=case["mlp_ratio"],
        qkv_bias=case["qkv_bias"], drop_rate=0.0, drop_path_rate=0.0, ape=case["ape"],
        patch_norm=case["patch_norm"],
        pretrained_window_sizes=case.get("pretrained_window_sizes") or [0] * len(case["depths"]))
    norm = (case.get("loss") or {}).get("norm_target")
    config = types.SimpleNamespace(NORM_TARGET=types.SimpleNamespace(
        ENABLE=bool(norm), PATCH_SIZE=(norm or {}).get("window", 47)))
    return simmim.SimMIM(config=config, encoder=encoder, encoder_stride=case["encoder_stride"],
                         in_chans=3, patch_size=case["patch_size"])


def check(checkout, path, save_pth=False):
    with safe_open(path, "pt") as f:
        case = json.loads(f.metadata()["case"])
    if case["type"] != "swinv2":
        print(f"{path}: not a swinv2 case, skipped")
        return True
    if case.get("head") or any(k != "norm_target" for k in (case.get("loss") or {})):
        print(f"{path}: the official module has only the linear head and masked L1, skipped")
        return True
    t = load_file(path)
    model = official_model(checkout, case).double()
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()
             if not k.startswith("expected.") and k not in ("input", "mask")}
    model.load_state_dict(state, strict=True)
    x, mask = t["input"].double(), t["mask"].long()
    loss = model(x, mask)
    loss.backward()
    rec = model.decoder(model.encoder(x, mask))
    want = t["expected.loss"].item()
    rel = abs(loss.item() - want) / abs(want)
    rec_err = (rec - t["expected.reconstruction"]).abs().max().item()
    grad_err = max(((p.grad - t["expected.grad." + n]).norm() / t["expected.grad." + n].norm()).item()
                   for n, p in model.named_parameters())
    if save_pth:
        out = path.replace(".safetensors", ".official.pth")
        torch.save({"model": {k: (v.float() if v.is_floating_point() else v)
                              for k, v in model.state_dict().items()}}, out)
        print(f"wrote {out}")
    ok = rel < 1e-6 and grad_err < 1e-5 and rec_err < 1e-5
    print(f"{path}: official loss {loss.item():.7f} vs case {want:.7f} (rel {rel:.1e}); "
          f"reconstruction max err {rec_err:.1e}; worst gradient rel err {grad_err:.1e}: "
          f"{'same' if ok else 'DIFFERENT'}")
    return ok


if __name__ == "__main__":
    save_pth = "--pth" in sys.argv
    cases = [a for a in sys.argv[2:] if a != "--pth"]
    results = [check(sys.argv[1], p, save_pth) for p in cases]
    sys.exit(0 if all(results) else 1)
