"""`tokenbench speed`: does a method's saving in GMACs turn into wall-clock speed?

For each method and knob it prints the GMACs, the GMACs ratio (dense / method), the measured speedup
(dense time / method time) and their quotient, the fraction of the ideal speedup reached. All models
run in one process on the same random batch; every round times dense and each method once, in an order
that rotates from round to round so that a drift in machine speed cancels out, and the speedup is the
median over rounds of (dense time / method time) within a round. Run it on a quiet machine: other
processes on the same cores make the ratios noisy (the IQR column says how noisy).
"""

from __future__ import annotations

from tokenbench.errors import BenchError
from tokenbench.registry import get_method, knob_label

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
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype of every forward")
    return p


def parse_cell(text: str) -> tuple[str, dict]:
    """'tome:r=13' -> ('tome', {'r': 13}); knobs parsed and checked by the method's own knobs, the rest at
    their first sweep value."""
    name, _, spec = text.partition(":")
    method = get_method(name.strip())
    given = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            own = ", ".join(k.name for k in method.knobs) or "none"
            raise BenchError(f"--cell {text}: expected {name}:KNOB=V with KNOB one of {own}")
        given[key] = value
    return method.name, method.check_knobs(method.parse_knobs(given), default="sweep")


def run(args):
    import statistics

    import torch
    from tabulate import tabulate

    from tokenbench import api, measure, models

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but no CUDA device is available")
    if args.batch_size < 1 or args.rounds < 1 or args.warmup < 0:
        raise BenchError("--batch-size and --rounds must be at least 1, --warmup at least 0")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads {args.threads}: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = [parse_cell(c) for c in (args.cell or DEFAULT_CELLS)]
    loaded = models.load_model(args.model, args.checkpoint)
    images = torch.randn(args.batch_size, *models.input_shape(loaded.model),
                         generator=torch.Generator().manual_seed(0))
    built = [api.apply(loaded.model, "none")]
    for name, knobs in cells:
        torch.manual_seed(0)
        built.append(api.apply(loaded.model, name, **knobs))
    built = [m.to(device).eval() for m in built]
    gmacs = [api.gmacs(m, images[:8].to(device)).mean().item() for m in built]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{loaded.name} ({loaded.weights}), batch {args.batch_size} at {tuple(images.shape[1:])}, {device.type}"
          f"{threads}, {args.dtype}, {args.rounds} rounds (+{args.warmup} warm-up)", flush=True)
    times, _ = measure.interleaved_seconds(built, images.to(device), args.dtype, repeats=args.rounds,
                                           warmup_rounds=args.warmup, warmup_s=0.0, min_repeat_s=0.0)
    speedup, iqr = measure.speedups(times)
    rows = [["none", "-", f"{gmacs[0]:.3f}", "1.000", f"{statistics.median(times[:, 0]) * 1e3:.0f}", "1.000", "-", "-"]]
    for j, (name, knobs) in enumerate(cells, 1):
        ratio = gmacs[0] / gmacs[j]
        rows.append([name, knob_label(knobs), f"{gmacs[j]:.3f}", f"{ratio:.3f}",
                     f"{statistics.median(times[:, j]) * 1e3:.0f}", f"{speedup[j]:.3f}", f"{iqr[j]:.3f}",
                     f"{speedup[j] / ratio:.2f}"])
    print(tabulate(rows, headers=["method", "knobs", "GMACs", "GMACs ratio", "ms / batch", "speedup", "IQR",
                                  "speedup / GMACs ratio"], disable_numparse=True))
    return 0
