"""`tokenbench speed`: does a method's saving in GMACs turn into wall-clock speed?

For each method and knob it prints the GMACs, the GMACs ratio (dense / method), the measured speedup
(dense time / method time) and their quotient, the fraction of the ideal speedup reached. All models
run in one process on the same random batch; every round times dense and each method once, in an order
that rotates from round to round so that a drift in machine speed cancels out, and the speedup is the
median over rounds of (dense time / method time) within a round. Run it on a quiet machine: other
processes on the same cores make the ratios noisy (the IQR column says how noisy).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from tabulate import tabulate

from bench import models
from bench.measure import DTYPES, autocast
from bench.commands.profile import input_shape
from bench.ledger import measure_gmacs
from bench.registry import BenchError, get_method

DEFAULT_CELLS = ("topk:keep=0.7", "evit:keep=0.7", "tome:r=13")


def add_parser(sub):
    p = sub.add_parser("speed", help="measured speedup over dense next to the GMACs ratio, per method and knob")
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT name (random-init unless --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="local weights file (adaptive methods depend on weights)")
    p.add_argument("--cell", action="append", default=None, metavar="METHOD:KNOB=V[,KNOB=V]",
                   help=f"a method and its knobs; repeat for more (default: {' '.join(DEFAULT_CELLS)})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs dense and every method once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype of every forward")
    return p


def parse_cell(text: str) -> tuple[str, dict]:
    """'tome:r=13' -> ('tome', {'r': 13}), knobs parsed and checked by the method's own knob definitions."""
    name, _, spec = text.partition(":")
    method = get_method(name.strip())
    own = {k.name: k for k in method.knobs}
    knobs = {k.name: k.sweep[0] for k in method.knobs}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in own:
            raise BenchError(f"--cell {text}: expected {name}:KNOB=V with KNOB one of {', '.join(own) or 'none'}")
        knobs[key] = own[key].parse(value)
    return method.name, knobs


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(models_by_cell: list, images: torch.Tensor, rounds: int, warmup: int,
                      dtype: str = "fp32") -> list[list[float]]:
    """Seconds per forward, [rounds][model], with the order of the models rotating every round."""
    times = []
    with torch.inference_mode(), autocast(images.device, dtype):
        for r in range(warmup + rounds):
            row = [0.0] * len(models_by_cell)
            for j in range(len(models_by_cell)):
                i = (r + j) % len(models_by_cell)
                _sync(images.device)
                start = time.perf_counter()
                models_by_cell[i](images)
                _sync(images.device)
                row[i] = time.perf_counter() - start
            if r >= warmup:
                times.append(row)
    return times


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.rounds < 1 or args.warmup < 0:
        raise BenchError("--batch-size and --rounds must be at least 1, --warmup at least 0")
    cells = [parse_cell(c) for c in (args.cell or DEFAULT_CELLS)]
    loaded = models.load_model(args.model, args.checkpoint)
    images = torch.randn(args.batch_size, *input_shape(loaded.model), generator=torch.Generator().manual_seed(0))
    built = [get_method("none").build(loaded.model)]
    for name, knobs in cells:
        torch.manual_seed(0)
        built.append(get_method(name).build(loaded.model, **knobs))
    built = [m.to(device).eval() for m in built]
    gmacs = [measure_gmacs(m, images[:8].to(device)).gmacs.mean().item() for m in built]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{loaded.name} ({loaded.weights}), batch {args.batch_size} at {tuple(images.shape[1:])}, {device.type}"
          f"{threads}, {args.dtype}, {args.rounds} rounds (+{args.warmup} warm-up)", flush=True)
    times = np.array(interleaved_times(built, images.to(device), args.rounds, args.warmup, args.dtype))
    dense_ms = statistics.median(times[:, 0]) * 1e3
    rows = [["none", "-", f"{gmacs[0]:.3f}", "1.000", f"{dense_ms:.0f}", "1.000", "-", "-"]]
    for j, (name, knobs) in enumerate(cells, 1):
        ratio = gmacs[0] / gmacs[j]
        speedups = times[:, 0] / times[:, j]
        q1, q3 = np.percentile(speedups, [25, 75])
        speedup = float(np.median(speedups))
        rows.append([name, " ".join(f"{k}={v:g}" for k, v in knobs.items()), f"{gmacs[j]:.3f}", f"{ratio:.3f}",
                     f"{statistics.median(times[:, j]) * 1e3:.0f}", f"{speedup:.3f}", f"{q3 - q1:.3f}",
                     f"{speedup / ratio:.2f}"])
    print(tabulate(rows, headers=["method", "knobs", "GMACs", "GMACs ratio", "ms / batch", "speedup", "IQR",
                                  "speedup / GMACs ratio"], disable_numparse=True))
    return 0
