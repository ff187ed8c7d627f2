"""`tokenbench speed`: does a method's saving in GMACs turn into wall-clock speed (`tokenbench.speed`)?

For each method and knob it prints the GMACs, the GMACs ratio (dense / method), the measured speedup
(dense time / method time) and their quotient, the fraction of the ideal speedup reached; with
`--batch-sizes` at each batch size, and `--plot` draws the curve. Run it on a quiet machine: other
processes on the same cores make the ratios noisy (the IQR column says how noisy).
"""

from __future__ import annotations

from tokenbench.errors import BenchError

DEFAULT_CELLS = ("topk:keep=0.7", "evit:keep=0.7", "tome:r=13")


def add_parser(sub):
    p = sub.add_parser("speed", help="measured speedup over dense next to the GMACs ratio, per method and knob")
    p.add_argument("--model", default="deit_small_patch16_224", help="timm ViT name (random-init unless --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="local weights file (adaptive methods depend on weights)")
    p.add_argument("--cell", action="append", default=None, metavar="METHOD:KNOB=V[,KNOB=V]",
                   help=f"a method and its knobs; repeat for more (default: {' '.join(DEFAULT_CELLS)})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch-sizes", default=None, metavar="B[,B...]",
                   help="measure at each of these batch sizes instead (e.g. 1,4,16,64,256): the batch-size curve")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="with --batch-sizes: plot speedup against batch size next to each GMACs ratio")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs dense and every method once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile (inductor) dense and every method; speedups over compiled dense, compile time apart")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype of every forward")
    return p


def run(args):
    import torch

    from tokenbench.models import loading as models
    from tokenbench.run.speed import format_table, parse_cell, plot_batch_curve, speed_table

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but no CUDA device is available")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()] if args.batch_sizes else [args.batch_size]
    except ValueError:
        raise BenchError(f"--batch-sizes {args.batch_sizes!r}: give whole numbers like 1,4,16,64") from None
    if args.plot and not args.batch_sizes:
        raise BenchError("--plot draws the batch-size curve: give --batch-sizes too")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads {args.threads}: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = [parse_cell(c) for c in (args.cell or DEFAULT_CELLS)]
    loaded = models.load_model(args.model, args.checkpoint)
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    setting = (f"{loaded.name} ({loaded.weights}) at {tuple(models.input_shape(loaded.model))}, {args.device}{threads}, "
               f"{args.dtype}{', compiled' if args.compile else ''}, {args.rounds} rounds (+{args.warmup} warm-up)")
    print(setting, flush=True)
    table = speed_table(loaded.model, cells, batch_sizes, args.rounds, args.warmup, args.device, args.dtype,
                        compile=args.compile, log=lambda line: print(line, flush=True))
    print(format_table(table, "simple"))
    if args.plot:
        print(f"wrote {plot_batch_curve(table, args.plot, setting)}")
    return 0
