"""`tokenbench bench`: sweep methods over their knobs and append one results row per configuration.

The options are the keyword arguments of `tokenbench.sweep`, which does the work.
"""

from __future__ import annotations

from tokenbench.cli.options import add_knob_options, given_knobs
from tokenbench.data.registry import dataset_names
from tokenbench.reduce.registry import knob_overrides, resolve_methods
from tokenbench.run.limits import check_sweep_numbers


def add_parser(sub):
    p = sub.add_parser("bench", help="sweep methods over their knobs and record accuracy, GMACs and speed")
    p.add_argument("--method", default="all", help="'all' or a comma-separated list (see `tokenbench methods`)")
    p.add_argument("--model", default=None,
                   help="timm ViT name (default: the embedded vit_digits; vit_video_digits for moving-digits)")
    p.add_argument("--checkpoint", default=None, help="local weights file (read with weights_only=True)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub or its cache)")
    p.add_argument("--dataset", default="digits", help=f"one of: {', '.join(dataset_names())}")
    p.add_argument("--data-root", default=None, help="dataset folder (not needed for digits)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--protocol", default=None,
                   help="video views FRAMESxSTRIDExCLIPSxCROPS or 'videomae' (16x4x5x3); default: the model's own")
    p.add_argument("--out", required=True, help="results folder; rows go to OUT/results.jsonl")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=None, help="throughput batch (default 256 on cuda, 32 on cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median and IQR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-timing", action="store_true", help="skip throughput and latency (accuracy and GMACs only)")
    p.add_argument("--recalibrate", action="store_true",
                   help="recompute calibrations (DiffRate's rates, DVT's thresholds) instead of reusing stored ones")
    p.add_argument("--compile", action="store_true",
                   help="time every model (dense too) compiled by torch.compile (inductor); compile time apart")
    p.add_argument("--budget", type=float, default=None, metavar="F",
                   help="matched compute: per method, the knob value with GMACs <= F x dense instead of the sweep "
                        "(searched; adaptive methods calibrated on the val split)")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of counting it")
    p.add_argument("--cache-dir", default=None,
                   help="store of decoded, preprocessed images reused across sweeps (default ~/.cache/tokenbench)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes: for the image store, and for a video set too big to keep in memory "
                        "(decoded at every configuration); 0 decodes in this process (default: min(8, cores))")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run cells I, I+N, ... of the sorted sweep; rows go to OUT/results-shard-I-of-N.jsonl")
    add_submitit_options(p)
    add_knob_options(p, many=True, default_help="replaces the method's default sweep values")
    return p


def add_submitit_options(p):
    g = p.add_argument_group("SLURM via submitit (pip install 'tokenbench[slurm]')")
    g.add_argument("--submitit", action="store_true", help="submit the sweep as a job array instead of running it")
    g.add_argument("--jobs", type=int, default=1, help="shards of the sweep, one array job each (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per job; that many processes run data parallel")
    g.add_argument("--nodes", type=int, default=1, help="nodes per job (data parallel across them)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--timeout-min", type=int, default=60)
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--array-parallelism", type=int, default=None, help="at most this many array jobs at once")
    g.add_argument("--submitit-folder", default=None, help="logs and pickles (default: OUT/submitit/%%j)")
    g.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit executor (default: slurm where sbatch exists, else local)")


def sweep_arguments(args) -> dict:
    """The keyword arguments of `tokenbench.sweep` that these options stand for."""
    return dict(methods=args.method, model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                dataset=args.dataset, data_root=args.data_root, split=args.split, protocol=args.protocol,
                out=args.out, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                threads=args.threads, repeats=args.repeats, seed=args.seed, timing=not args.no_timing,
                budget=args.budget, knobs=given_knobs(args), strict=args.strict, cache_dir=args.cache_dir,
                workers=args.workers, shard=args.shard, compile=args.compile, recalibrate=args.recalibrate)


def check_arguments(args) -> None:
    """The errors the options alone reveal, found before torch, timm or any data are loaded."""
    knob_overrides(resolve_methods(args.method), given_knobs(args))
    check_sweep_numbers(args.batch_size, args.repeats, args.threads, args.workers, args.seed, args.budget)


def run(args):
    check_arguments(args)
    if args.submitit:  # submitted from a login node: the jobs check the device
        from tokenbench.run import distributed, slurm

        distributed.parse_shard(args.shard)
        slurm.submit(sweep_arguments(args), jobs=args.jobs, out=args.out, folder=args.submitit_folder,
                     cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min, partition=args.slurm_partition,
                     account=args.slurm_account, array_parallelism=args.array_parallelism)
        return 0
    from tokenbench.run.sweep import sweep

    sweep(**sweep_arguments(args))
    return 0
