#!/usr/bin/env python3
"""Checks a run's TensorBoard event files with TensorBoard's own reader (EventAccumulator,
no TensorFlow) against the run's metrics.jsonl.

Every metrics.jsonl scalar must appear under its tag once per step, with the value of the
newest metrics.jsonl line for that step (as float32, TensorBoard's scalar type). TensorBoard's
reader stops at a bad CRC without an error, so every expected step is asserted: a damaged
record shows up here as missing steps. Exit status 1 lists every problem.
"""
import argparse
import json
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "images_per_sec": "perf/images_per_sec",
    "data_wait_share": "perf/data_wait_share",
    "step_seconds": "perf/step_seconds",
    "allreduce_seconds": "perf/allreduce_seconds",
    "samples_skipped": "data/samples_skipped",
    "generation": "run/generation",
    "eval_top1": "eval/top1",
    "eval_top5": "eval/top5",
    "probe_knn_top1": "probe/knn_top1",
    "probe_linear_top1": "probe/linear_top1",
}
IMAGE_TAG = "recon/original_masked_prediction"
HPARAMS_TAGS = ["_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--min-images", type=int, default=1)
    ap.add_argument("--hparam", action="append", default=[], help="name=value the hparams must hold")
    ap.add_argument("--hparams-metric", default="train/loss")
    args = ap.parse_args()

    expected = {}
    with open(args.metrics) as f:
        for line in f:
            m = json.loads(line)
            for key in TAGS:
                if m.get(key) is not None:
                    expected.setdefault(key, {})[m["step"]] = m[key]

    acc = EventAccumulator(args.logdir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    problems = []
    checked = 0
    for key, tag in TAGS.items():
        want = expected.get(key, {})
        if not want:
            continue
        if tag not in tags["scalars"]:
            problems.append(f"{tag}: no such scalar tag (metrics.jsonl has {len(want)} points of {key})")
            continue
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        duplicates = sorted({s for s in steps if steps.count(s) > 1})
        if duplicates:
            problems.append(f"{tag}: steps shown more than once: {duplicates[:10]}")
        got = {e.step: e.value for e in events}
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing:
            problems.append(f"{tag}: {len(missing)} steps missing, first {missing[:10]}")
        if extra:
            problems.append(f"{tag}: steps not in metrics.jsonl: {extra[:10]}")
        for step, value in sorted(want.items()):
            if step in got and got[step] != float(np.float32(value)):
                problems.append(f"{tag} at step {step}: {got[step]} != metrics.jsonl {value}")
                break
        checked += len(want)

    images = acc.Images(IMAGE_TAG) if IMAGE_TAG in tags["images"] else []
    image_steps = [i.step for i in images]
    if len(images) < args.min_images:
        problems.append(f"{IMAGE_TAG}: {len(images)} images, expected at least {args.min_images}")
    if len(set(image_steps)) != len(image_steps):
        problems.append(f"{IMAGE_TAG}: a step shown more than once: {image_steps}")
    for image in images:
        if not image.encoded_image_string.startswith(b"\x89PNG") or image.width <= 0:
            problems.append(f"{IMAGE_TAG} at step {image.step}: not a PNG with a size")

    try:
        content = acc.PluginTagToContent("hparams")
    except KeyError:
        content = {}
    for tag in HPARAMS_TAGS:
        if tag not in content:
            problems.append(f"hparams: no {tag} record")
    if "_hparams_/experiment" in content:
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        metrics = [m.name.tag for m in experiment.metric_infos]
        if args.hparams_metric not in metrics:
            problems.append(f"hparams: metric {args.hparams_metric} not among {metrics}")
        if len(experiment.hparam_infos) < 10:
            problems.append(f"hparams: only {len(experiment.hparam_infos)} hparams described")
    if "_hparams_/session_start_info" in content:
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        for pair in args.hparam:
            name, value = pair.split("=", 1)
            if name not in hparams:
                problems.append(f"hparams: {name} missing")
                continue
            v = hparams[name]
            kind = v.WhichOneof("kind")
            shown = {"number_value": v.number_value, "string_value": v.string_value, "bool_value": v.bool_value}.get(kind)
            if str(shown) != value and not (kind == "number_value" and float(value) == shown):
                problems.append(f"hparams: {name} = {shown!r}, expected {value}")
    if "_hparams_/session_end_info" in content:
        end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
        if end.session_end_info.status != 1:
            problems.append(f"hparams: session end status {end.session_end_info.status}, expected SUCCESS")

    if problems:
        print("TensorBoard check FAILED:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        sys.exit(1)
    print(f"TensorBoard check passed: {checked} scalar points, {len(images)} images at steps {image_steps}, hparams present")


if __name__ == "__main__":
    main()
