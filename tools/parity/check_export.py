"""Check `worker export --format pytorch` against the PyTorch reference of the official model.

    python check_export.py MODEL.pth BATCH.safetensors

MODEL.pth is loaded with `torch.load(weights_only=True)` (what a cautious user does) into
`simmim_reference.SimMIM` built from the model config that `worker reconstruct --dump` stored
in BATCH.safetensors with the batch (input, mask) and the Rust loss and reconstruction on it.
Prints one JSON line (torch loss, Rust loss, relative gap, worst reconstruction error) and
exits 1 when the gap exceeds --tolerance (default 1e-4, f32 against f32)."""
import argparse
import json
import sys

import struct

import torch

from simmim_reference import SimMIM

DTYPES = {"F32": torch.float32, "U8": torch.uint8, "I64": torch.int64, "F64": torch.float64}


def read_safetensors(path):
    """Tensors and metadata of a safetensors file, with the standard library and torch only
    (the GPU machine has PyTorch but maybe not the safetensors package)."""
    raw = open(path, "rb").read()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    metadata = header.pop("__metadata__", {}) or {}
    body = raw[8 + size:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=DTYPES[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"])
    return tensors, metadata


def case_from_config(config):
    """The reference's constructor dict from a simmim-rs model config (its JSON)."""
    encoder = dict(config["encoder"])
    case = {"mlp_ratio": 4.0, "qkv_bias": True, "ape": False, "patch_norm": True,
            "use_ape": False, "use_rpb": False, "use_shared_rpb": False, "init_values": None}
    case.update({k: v for k, v in encoder.items() if v is not None or k not in case})
    if case["type"] == "swin":
        case["encoder_stride"] = case["patch_size"] * 2 ** (len(case["depths"]) - 1)
    else:
        case["encoder_stride"] = case["patch_size"]
    return case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pth")
    ap.add_argument("batch")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    batch, metadata = read_safetensors(args.batch)
    config = json.loads(metadata["simmim_config"])
    model = SimMIM(case_from_config(config))
    state = torch.load(args.pth, map_location="cpu", weights_only=True)["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {n for n, _ in model.named_parameters()}
    if params & set(missing) or unexpected:
        sys.exit(f"the export does not fit the reference: missing {sorted(params & set(missing))}, "
                 f"unexpected {sorted(unexpected)}")
    model.eval()
    with torch.no_grad():
        loss, rec = model(batch["input"], batch["mask"].long())
    rust = batch["expected.loss"].item()
    gap = abs(loss.item() - rust) / max(abs(rust), 1e-12)
    rec_err = (rec - batch["expected.reconstruction"]).abs().max().item()
    print(json.dumps({"torch_loss": loss.item(), "rust_loss": rust, "relative_gap": gap,
                      "max_reconstruction_error": rec_err, "tensors": len(state)}))
    sys.exit(0 if gap <= args.tolerance else 1)


if __name__ == "__main__":
    main()
