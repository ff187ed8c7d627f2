"""Decode once, sweep many: a whole `tokenbench bench` sweep against the sum of its model-only times.

    python tests/benchmarks/decode_once.py --data-root ../shared/data/imagenet-val --out runs/decode_once

Sweeps every training-free method at its default knobs (24 configurations) over the ImageNet images with a
random-init DeiT-style ViT (12 blocks; `--width` sets its dimension so the run fits a small CPU; 224x224
input and the model's own eval transform), twice: with an empty image store (JPEGs decoded during the
sweep) and with the store filled. The model-only time of a configuration is its forward passes over the
same images, already decoded, normalised and in memory. Both wall-clock and CPU time (this process and its
decoding workers) are reported: on a shared machine the CPU time is the steadier of the two. The sweeps
decode with the default workers (min(8, cores)). Prints and writes OUT/decode_once.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import timm
import torch

from tokenbench.cli import main
from tokenbench.data import registry as datasets
from tokenbench.data import store as cache
from tokenbench.measure.results import cpu_name, read_results
from tokenbench.models import loading as models
from tokenbench.reduce.registry import get_method

METHODS = ("none", "topk", "random", "evit", "tome", "ats")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decoding workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def model_only_seconds(checkpoint: Path, store: cache.ImageStore, batch_size: int) -> tuple[dict, int]:
    loaded = models.load_model(checkpoint=checkpoint)
    batches = [x for x, _ in store.batches(batch_size)]
    total, configurations = {"wall": 0.0, "cpu": 0.0}, 0
    for name in METHODS:
        method = get_method(name)
        for knobs in method.sweep_points({}):
            torch.manual_seed(0)
            model = method.build(loaded.model, **knobs).eval()
            with torch.inference_mode():
                model(batches[0][:2])  # first-call allocations are not part of the model's time
                start, cpu = time.perf_counter(), cpu_seconds()
                for x in batches:
                    model(x)
                total["wall"] += time.perf_counter() - start
                total["cpu"] += cpu_seconds() - cpu
            configurations += 1
    return total, configurations


def main_(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", default="runs/decode_once")
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--width", type=int, default=32, help="embedding dimension (heads = width / 32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    kwargs = dict(embed_dim=args.width, num_heads=args.width // 32)
    checkpoint = out / "random_init.pt"
    models.save_checkpoint(checkpoint, timm.create_model(args.model, **kwargs), args.model, {}, kwargs)
    sweep = ["bench", "--method", ",".join(METHODS), "--checkpoint", str(checkpoint), "--dataset", "imagenet",
             "--data-root", args.data_root, "--no-timing", "--cache-dir", str(out / "cache"),
             "--threads", str(args.threads), "--batch-size", str(args.batch_size)]

    def sweep_seconds(run: str) -> dict:
        start, cpu = time.perf_counter(), cpu_seconds()
        assert main(sweep + ["--out", str(out / run)]) == 0
        return {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu}

    seconds = {"empty_store": sweep_seconds("empty_store")}  # the first sweep decodes the JPEGs once
    rows = read_results(out / "empty_store" / "results.jsonl")
    loaded = models.load_model(checkpoint=checkpoint)
    transform = datasets.eval_transform(loaded.model)
    store = cache.load_images(datasets.build_dataset("imagenet", "test", transform, args.data_root), transform,
                              out / "cache")
    model_only, configurations = model_only_seconds(checkpoint, store, args.batch_size)
    assert configurations == len(rows)
    seconds["filled_store"] = sweep_seconds("filled_store")  # a later sweep reads the store
    report = {
        "command": "python tests/benchmarks/decode_once.py " + " ".join(argv or []),
        "configurations": configurations, "images": len(store), "model": args.model, "model_kwargs": kwargs,
        "threads": args.threads, "batch_size": args.batch_size, "cpu": cpu_name(),
        "sweep_seconds": seconds, "model_only_seconds": model_only,
        **{f"ratio_{run}_{clock}": seconds[run][clock] / model_only[clock]
           for run in seconds for clock in ("wall", "cpu")},
    }
    (out / "decode_once.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    import sys

    main_(sys.argv[1:])
