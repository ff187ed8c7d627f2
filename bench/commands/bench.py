"""`tokenbench bench`: sweep methods over their knobs and append one results row per configuration."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bench import budget, cache, data, distributed, measure, models, results
from bench.registry import BenchError, get_method, knob_by_name, resolve_methods


def add_parser(sub):
    p = sub.add_parser("bench", help="sweep methods over their knobs and record accuracy, GMACs and speed")
    p.add_argument("--method", default="all", help="'all' or a comma-separated list (see `tokenbench methods`)")
    p.add_argument("--model", default=None,
                   help="timm ViT name (default: the embedded vit_digits; vit_video_digits for moving-digits)")
    p.add_argument("--checkpoint", default=None, help="local weights file (read with weights_only=True)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub or its cache)")
    p.add_argument("--dataset", default="digits", help=f"one of: {', '.join(data.dataset_names())}")
    p.add_argument("--data-root", default=None, help="dataset folder (not needed for digits)")
    p.add_argument("--split", default="test", choices=data.SPLITS)
    p.add_argument("--protocol", default=None,
                   help="video views FRAMESxSTRIDExCLIPSxCROPS or 'videomae' (16x4x5x3); default: the model's own")
    p.add_argument("--out", required=True, help="results folder; rows go to OUT/results.jsonl")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=None, help="throughput batch (default 256 on cuda, 32 on cpu)")
    p.add_argument("--dtype", default="fp32", choices=list(measure.DTYPES))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median and IQR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-timing", action="store_true", help="skip throughput and latency (accuracy and GMACs only)")
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
    distributed.add_submitit_options(p)
    for knob in knob_by_name().values():
        p.add_argument(f"--{knob.name}", default=None, metavar="V[,V...]",
                       help=f"override the sweep values of knob '{knob.name}' ({knob.help})")
    return p


def knob_overrides(args) -> dict[str, tuple]:
    overrides = {}
    for name, knob in knob_by_name().items():
        text = getattr(args, name, None)
        if text is not None:
            overrides[name] = tuple(knob.convert(v) for v in text.split(",") if v.strip())
    return overrides


def preload(dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and preprocess every image once; all configurations reuse the tensors."""
    images, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=0):
        images.append(x)
        labels.append(y)
    if not images:
        raise BenchError("the dataset has no images")
    return torch.cat(images), torch.cat(labels)


def batches(images, labels, batch_size):
    for i in range(0, len(labels), batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]


def timing_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The first `batch_size` real images (cycled if the dataset is smaller)."""
    reps = -(-batch_size // len(images))
    return images.repeat(reps, *[1] * (images.ndim - 1))[:batch_size] if reps > 1 else images[:batch_size]


def fmt_knobs(knobs: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in knobs.items()) or "-"


def checked_options(args) -> tuple[torch.device, int, dict, dict]:
    """(device, batch size, methods by name, knob overrides), or a BenchError naming the bad option."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but no CUDA device is available")
    batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
    if batch_size < 1 or args.repeats < 1:
        raise BenchError("--batch-size and --repeats must be at least 1")
    names = resolve_methods(args.method)
    overrides = knob_overrides(args)
    methods = {name: get_method(name) for name in names}
    known_knobs = {k.name for m in methods.values() for k in m.knobs}
    for name in overrides:
        if name not in known_knobs:
            raise BenchError(f"--{name} is not a knob of {', '.join(names)}")
    return device, batch_size, methods, overrides


def plan_cells(methods: dict, backbone, args, overrides: dict, calibration, dense) -> list[tuple]:
    """(method name, method, loaded model, knobs) per configuration: the sweep, or the budget-matched points."""
    plan = []
    for name, method in methods.items():
        loaded = backbone
        if method.needs_training:
            path = args.checkpoint if len(methods) == 1 and args.checkpoint else method.checkpoint_for(args.model, args.dataset)
            if path is None:
                print(f"{name}: skipped, it needs weights trained with it "
                      f"(tokenbench train --method {name} ...; then --method {name} --checkpoint FILE)")
                continue
            loaded = models.load_model(checkpoint=path)
        points = (budget.matched_points(method, loaded.model, args.budget, calibration, dense)
                  if args.budget is not None else method.sweep_points(overrides))
        for knobs in points:
            for knob in method.knobs:
                knob.check(knobs[knob.name])
            plan.append((name, method, loaded, knobs))
    return plan


def timing_fields(model, images: torch.Tensor, device: torch.device, args) -> dict:
    """Throughput at the batch, batch-1 latency and peak memory, as row fields."""
    cuda = device.type == "cuda"
    tp = measure.throughput(model, images, device, args.dtype, repeats=args.repeats,
                            warmup_s=2.0 if cuda else 0.5, min_repeat_s=0.2 if cuda else 0.1)
    lat = measure.latency(model, images, device, args.dtype, repeats=args.repeats,
                          warmup_s=1.0 if cuda else 0.3, min_repeat_s=0.05)
    return dict(throughput=tp.median, throughput_iqr=tp.iqr, timing_repeats=tp.repeats,
                timing_iterations=tp.iterations, latency_ms=lat.median, latency_iqr_ms=lat.iqr,
                peak_memory_mb=measure.peak_memory_mb(model, images, device, args.dtype))


def run(args):
    if args.submitit:  # submitted from a login node: the jobs check the device
        distributed.parse_shard(args.shard)
        distributed.submit(args)
        return 0
    device, batch_size, methods, overrides = checked_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or ("vit_video_digits" if args.dataset == "moving-digits" else "vit_digits")
    shard = distributed.parse_shard(args.shard)
    world, device = distributed.init(device)
    backbone = models.load_model(args.model, args.checkpoint, args.pretrained)
    results_path = Path(args.out) / distributed.results_name(shard)
    timed = {row["cell_id"]: row.get("throughput") is not None for row in results.read_results(results_path)}
    transform = data.eval_transform(backbone.model, args.protocol)
    ds = data.build_dataset(args.dataset, args.split, transform, args.data_root)
    if args.strict and ds.unreadable:
        raise BenchError(f"{ds.unreadable} unreadable images in {args.dataset}/{args.split} (drop --strict to skip)")
    for turn in ("first", "others"):  # rank 0 fills the image store, then the other ranks read it
        if (turn == "first") == world.is_main:
            store = cache.load_images(ds, transform, args.cache_dir, args.strict, args.workers)
        distributed.barrier(world)
    images, labels = store.batch(0, min(len(store), batch_size))
    timing_images = timing_batch(images.flatten(0, 1) if ds.views > 1 else images, batch_size).to(device)
    video = getattr(transform, "protocol", None)  # video rows record their views, per-view GMACs and clips/s
    calibration = None
    if args.budget is not None or any(m.needs_calibration for m in methods.values()):
        if args.split == "val":
            raise BenchError("--budget and methods that calibrate on the val split (dvt) must be measured on "
                             "another --split")
        calibration = preload(data.build_dataset(args.dataset, "val", data.eval_transform(backbone.model),
                                                 args.data_root).dataset)
    env = results.provenance(device, args.seed)
    dense = budget.dense_gmacs(backbone.model, calibration[0]) if args.budget is not None else None
    plan = plan_cells(methods, backbone, args, overrides, calibration, dense)
    plan = distributed.shard_of(plan, shard, key=lambda cell: distributed.cell_sort_key(cell[0], cell[3]))
    log = print if world.is_main else (lambda *a, **k: None)

    cached = ("streamed, decoded at every configuration" if isinstance(store, cache.StreamedStore)
              else "from the image cache" if store.cached else "decoded now")
    log(f"{len(plan)} configurations of {len(methods)} methods on {backbone.name} ({backbone.weights}), "
        f"{args.dataset}/{args.split} ({len(store)} images {cached}, {store.unreadable} unreadable), "
        f"{env['device_name']}, {args.dtype}, batch {batch_size}, {torch.get_num_threads()} threads"
        f"{f', {world.size} processes' if world.size > 1 else ''} -> {results_path}")
    started = time.perf_counter()
    for i, (name, method, loaded, knobs) in enumerate(plan, 1):
        cell = {"method": name, "knobs": knobs, "model": loaded.name, "weights": loaded.weights,
                "dataset": args.dataset, "split": args.split, "device": device.type,
                "device_name": env["device_name"], "dtype": args.dtype, "batch_size": batch_size,
                "threads": torch.get_num_threads() if device.type == "cpu" else None, "seed": args.seed,
                **({"protocol": str(video)} if video else {}),
                **({"budget": args.budget} if args.budget is not None else {})}
        cid = results.cell_id(cell)
        if cid in timed and (timed[cid] or args.no_timing):
            log(f"[{i}/{len(plan)}] {name} {fmt_knobs(knobs)}: already recorded, skipped")
            continue
        torch.manual_seed(args.seed)
        extra = {"calibration": calibration} if method.needs_calibration else {}
        model = method.build(loaded.model, **knobs, **extra).to(device).eval()
        start, stop = distributed.contiguous_slice(len(store), world)
        local = (measure.evaluate(model, store.batches(batch_size, start, stop), device, args.dtype, ds.views)
                 if stop > start else None)
        evaluation = distributed.gather(local, world)
        if not world.is_main:
            continue
        row = {**cell, "cell_id": cid, "family": method.family, "needs_training": method.needs_training,
               "n_unreadable": store.unreadable, "n_missing": ds.missing, "params": measure.parameter_count(model),
               "trained_with": loaded.meta.get("trained_with"),
               **evaluation.summary(), "provenance": env}
        if args.budget is not None:
            row.update(budget_achieved=row["gmacs"] / dense)
        if video:
            row.update(views=ds.views, gmacs_per_view=row["gmacs"] / ds.views, throughput_unit="clips/s",
                       cls_substitute=getattr(model, "cls_substitute", None))
        if not args.no_timing:
            row.update(timing_fields(model, timing_images, device, args))
        results.append_result(results_path, row)
        unit = "clips/s" if video else "img/s"
        speed = f", {row['throughput']:.0f} {unit}, {row['latency_ms']:.2f} ms at batch 1" if not args.no_timing else ""
        print(f"[{i}/{len(plan)}] {name} {fmt_knobs(knobs)}: top-1 {100 * row['top1']:.2f}%, "
              f"{row['gmacs']:.4g} GMACs{speed}", flush=True)
    log(f"done in {time.perf_counter() - started:.1f} s; {results_path}")
    return 0
