"""What a compact resume costs: the `strong` recipe run straight through against the same run stopped and
resumed from its compact state (float16 weights and EMA, AdamW moments rebuilt from 50 batches at
learning rate 0), next to what changing the seed alone does.

    python tests/benchmarks/compact_resume.py --data-root ../shared/data/cifar10 --out results/training

A scaled-down copy of the CIFAR-10 v2 run (`docs/cifar10-v2-training.md`), small enough for minutes on a
2-core CPU: `vit_cifar10` (v1's width) on `--images` training images (a fixed random subset), `--epochs` epochs stopped
after `--stop`, the recipe's augmentation, mixup/cutmix, stochastic depth and an EMA whose horizon is the same
fraction of the run as v2's (1,000 of 17,550 steps). For each seed: the straight run, then a run resumed from
the compact state it wrote at `--stop`. Compares the final val top-1 (EMA, 5,000 images) of resumed minus
straight against seed 1 minus seed 0. Prints and writes OUT/compact_resume.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from tokenbench.cli.train import augmenting
from tokenbench.data import registry as datasets
from tokenbench.measure.results import cpu_name
from tokenbench.models import loading as models
from tokenbench.run import training

V2_EMA_HORIZON = 1000 / (45 * 390)  # v2: EMA decay 0.999 over 45 epochs of 390 steps


class Stopped(Exception):
    pass


def run(seed: int, args, train_set, val_loader, state_file: Path, keep_at: Path | None = None) -> list[dict]:
    """One run of the scaled recipe; with `keep_at`, a copy of its compact state after epoch `--stop`."""
    model = models.create("vit_cifar10", num_classes=10, drop_path_rate=training.RECIPES["strong"]["drop_path"])
    steps = args.epochs * (len(train_set) // args.batch_size)
    fields = {k: v for k, v in training.RECIPES["strong"].items() if k not in ("augment", "drop_path")}
    fields["ema_decay"] = 1 - 1 / (V2_EMA_HORIZON * steps)
    cfg = training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, seed=seed, warmup_epochs=1,
                               **fields)

    def log(line):
        print(f"  seed {seed}: {line}", flush=True)
        if keep_at is not None and line.startswith(f"epoch={args.stop} "):
            shutil.copy(state_file, keep_at)

    return training.train(model, train_set, cfg, val_loader=val_loader, log=log, state_file=state_file,
                          identity={"seed": seed})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", default="runs/compact_resume")
    p.add_argument("--images", type=int, default=5120)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--stop", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = models.create("vit_cifar10", num_classes=10)
    eval_tf = datasets.eval_transform(probe)
    full = datasets.build_dataset("cifar10", "train", augmenting(eval_tf, True, "trivial", 32), args.data_root).dataset
    chosen = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))[:args.images]
    train_set = Subset(full, chosen.tolist())  # a fixed random subset: the split is sorted by class
    val = datasets.build_dataset("cifar10", "val", eval_tf, args.data_root).dataset
    val_loader = DataLoader(val, batch_size=256)
    started = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            state, kept = Path(tmp) / f"s{seed}.partial", Path(tmp) / f"s{seed}.at-stop"
            runs[f"straight, seed {seed}"] = run(seed, args, train_set, val_loader, state, keep_at=kept)
            shutil.copy(kept, state)  # the run as it was when stopped after --stop epochs
            runs[f"compact resume, seed {seed}"] = run(seed, args, train_set, val_loader, state)
    final = {name: history[-1]["ema_val_top1"] for name, history in runs.items()}
    s0, s1 = args.seeds[:2] if len(args.seeds) > 1 else (args.seeds[0], None)
    resumed_minus_straight = {seed: final[f"compact resume, seed {seed}"] - final[f"straight, seed {seed}"]
                              for seed in args.seeds}
    seed_gap = None if s1 is None else final[f"straight, seed {s1}"] - final[f"straight, seed {s0}"]
    p0 = final[f"straight, seed {s0}"]
    half_width = 1.96 * math.sqrt(p0 * (1 - p0) / len(val))
    report = {
        "command": "python tests/benchmarks/compact_resume.py " + " ".join(argv),
        "machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("data_root", "out")},
        "val_images": len(val), "seconds": round(time.perf_counter() - started, 1),
        "final_ema_val_top1": final, "resumed_minus_straight": resumed_minus_straight,
        "seed_gap": seed_gap, "val_ci95_half_width": half_width,
        "histories": {name: [{k: v for k, v in e.items() if k != "seconds"} for e in h] for name, h in runs.items()},
    }
    for name, top1 in final.items():
        print(f"{name}: EMA val top-1 {100 * top1:.2f} %")
    print("resumed - straight: " + ", ".join(f"seed {s} {100 * d:+.2f} pts" for s, d in resumed_minus_straight.items())
          + (f"; seed {s1} - seed {s0}: {100 * seed_gap:+.2f} pts" if seed_gap is not None else "")
          + f"; 95 % interval of one val top-1: ±{100 * half_width:.2f} pts")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compact_resume.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'compact_resume.json'}")


if __name__ == "__main__":
    main()
