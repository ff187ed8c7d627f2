"""The harness: every method swept over its knob values on one model and dataset, one results row each.

`tokenbench bench` is this function with its options from the command line; `tokenbench.sweep` is the same
function for Python users. Rows are appended to `OUT/results.jsonl` as they are measured (a rerun with the
same `out` skips the configurations already recorded) and returned as a pandas DataFrame.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from tokenbench.data import registry as datasets
from tokenbench.data import store as cache
from tokenbench.data.images import SPLITS
from tokenbench.errors import BenchError
from tokenbench.measure import budget as budgets
from tokenbench.measure import calibrations
from tokenbench.measure import metrics as measure
from tokenbench.measure import results as results
from tokenbench.models import loading as models
from tokenbench.reduce.knobs import knob_label
from tokenbench.reduce.prefix import PrefixStore, reusing
from tokenbench.reduce.registry import Method, get_method, knob_overrides, resolve_methods
from tokenbench.reduce.vit import check_vit
from tokenbench.run import distributed as distributed
from tokenbench.run import speed as speed
from tokenbench.run.limits import check_sweep_numbers


def timing_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The first `batch_size` real images (cycled if the dataset is smaller)."""
    reps = -(-batch_size // len(images))
    return images.repeat(reps, *[1] * (images.ndim - 1))[:batch_size] if reps > 1 else images[:batch_size]


NOISY = 0.1  # a timing whose IQR exceeds this fraction of its median is flagged
STOP = measure.StoppingRule(min_repeats=5, rel_iqr=NOISY / 2)  # `repeats` is the most a noisy machine gets


def timing_fields(model, images: torch.Tensor, dtype: str, repeats: int, compile: bool = False) -> dict:
    """Throughput at the batch, batch-1 latency and peak memory, as row fields; flagged noisy when either
    IQR exceeds 10% of its median, with the 1-minute load average before and after.

    With `compile`, the model is compiled afresh (dynamo's caches reset, so earlier cells can't push it past
    the recompile limit) for both timed shapes first; the compile time and what ran go in the row."""
    cuda = images.device.type == "cuda"
    compiled_fields = {}
    kernels = measure.attention_kernels(model, images[:2], dtype)
    if compile:
        import torch._dynamo as dynamo

        dynamo.reset()
        with speed.compile_limits():
            model, seconds, ran = speed.compiled(model, [images, images[:1]], dtype)
        compiled_fields = dict(compile_s=None if seconds != seconds else seconds, compiled=ran)
    load_before = os.getloadavg()[0]
    # On CPU the evaluation that just ran this model at this batch size is its warm-up: one sizing round here.
    # A CPU repeat of one forward at the batch (tens of ms) or a few at batch 1 is long enough for the clock;
    # the stopping rule, not a longer repeat, decides when the timings are tight enough.
    tp = measure.throughput(model, images, dtype, repeats=repeats, warmup_s=2.0 if cuda else 0.0,
                            min_repeat_s=0.2 if cuda else 0.05, warmup_rounds=2 if cuda else 1, stop=STOP)
    lat = measure.latency(model, images, dtype, repeats=repeats, warmup_s=1.0 if cuda else 0.0,
                          min_repeat_s=0.05 if cuda else 0.025, warmup_rounds=2, stop=STOP)
    noisy = tp.iqr > NOISY * tp.median or lat.iqr > NOISY * lat.median
    return dict(throughput=tp.median, throughput_iqr=tp.iqr, timing_repeats=tp.repeats, timing_rule=f"{STOP}, max {repeats}",
                timing_iterations=tp.iterations, latency_ms=lat.median, latency_iqr_ms=lat.iqr,
                peak_memory_mb=measure.peak_memory_mb(model, images, images.device, dtype),
                attention_kernels=kernels, timing_noisy=noisy,
                load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)], **compiled_fields)


def writable_folder(out: str | Path) -> Path:
    """`out` as a folder that can be created (or exists) and takes files, or a BenchError before any work.
    Nothing is created here: the sweep makes the folder once its inputs are known good."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out}: is a file, not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise BenchError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BenchError(f"--out {out}: cannot write there ({existing} is not writable)")
    return out


def reducible(model) -> bool:
    """Whether `model` is a ViT the block-level methods (and the dense baseline) wrap."""
    try:
        check_vit(model)
    except BenchError:
        return False
    return True


def check_options(device: str, dtype: str, split: str, batch_size: int | None, repeats: int,
                  threads: int | None = None, workers: int | None = None, seed: int = 0,
                  budget: float | None = None) -> tuple[torch.device, int]:
    """(device, batch size), or a BenchError naming the bad option, before any work."""
    check_sweep_numbers(batch_size, repeats, threads, workers, seed, budget)
    if dtype not in measure.DTYPES:
        raise BenchError(f"dtype {dtype!r}: use one of {', '.join(measure.DTYPES)}")
    if split not in SPLITS:
        raise BenchError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("device cuda, but no CUDA device is available")
    return chosen, (256 if chosen.type == "cuda" else 32) if batch_size is None else batch_size


def plan_cells(methods: dict[str, Method], backbone, model_name: str, dataset: str, checkpoint, overrides: dict,
               budget: float | None, calibration, dense: float | None, log, one_named: bool) -> list[tuple]:
    """(method name, method, loaded model, knobs) per configuration: the sweep, or the budget-matched points.

    A method that needs training runs on `checkpoint` when it is the one method the user named
    (`one_named`), else on the weights it ships for (model, dataset)."""
    plan = []
    for name, method in methods.items():
        loaded = backbone
        if method.needs_training:
            path = checkpoint if one_named and checkpoint else method.checkpoint_for(model_name, dataset)
            if path is None:
                log(f"{name}: skipped, it needs weights trained with it "
                    f"(tokenbench train --method {name} ...; then --method {name} --checkpoint FILE)")
                continue
            loaded = models.load_model(checkpoint=path)
        points = (budgets.matched_points(method, loaded.model, budget, calibration, dense, log=log)
                  if budget is not None else method.sweep_points(overrides))
        plan += [(name, method, loaded, method.check_knobs(knobs)) for knobs in points]
    return plan


def sweep(methods: str | list[str] = "all", model: str | None = None, *, checkpoint: str | None = None,
          pretrained: bool = False, dataset: str = "digits", data_root: str | None = None, split: str = "test",
          protocol: str | None = None, out: str | Path | None = None, device: str = "cpu", dtype: str = "fp32",
          batch_size: int | None = None, threads: int | None = None, repeats: int = 7, seed: int = 0,
          timing: bool = True, budget: float | None = None, knobs: dict | None = None, strict: bool = False,
          cache_dir: str | None = None, workers: int | None = None, shard: str | None = None,
          compile: bool = False, recalibrate: bool = False, log: Callable = print) -> pd.DataFrame:
    """Measure each method over its knob values (or at a matched `budget`) and return one row per configuration.

    `methods`: 'all', 'a,b' or a list of names. `knobs`: sweep values that replace a method's defaults,
    {name: 'v,v' or a list}. `out`: a folder to append the rows to (`OUT/results.jsonl`; resumable), or None.
    `timing=False` records accuracy and GMACs only; `compile=True` times every model (dense included)
    compiled by inductor, compile time apart (accuracy and GMACs are measured eager). The dense model is
    measured too when `methods` does not name it (its row has `baseline` set), so that every row has its
    reference. A calibrating method's settings come from the calibration store unless `recalibrate`
    (`tokenbench.measure.calibrations`). The other arguments are the `tokenbench bench` options.
    """
    names = resolve_methods(methods if isinstance(methods, str) else ",".join(methods))
    overrides = knob_overrides(names, knobs or {})
    chosen_device, batch_size = check_options(device, dtype, split, batch_size, repeats, threads, workers, seed,
                                              budget)
    if out is not None:
        writable_folder(out)
    method_objects = {name: get_method(name) for name in names}
    if threads:
        torch.set_num_threads(threads)
    model = model or ("vit_video_digits" if dataset == "moving-digits" else "vit_digits")
    shard_spec = distributed.parse_shard(shard)
    world, chosen_device = distributed.init(chosen_device)
    backbone = models.load_model(model, checkpoint, pretrained)
    for method in method_objects.values():  # an unsupported backbone is refused before any work
        if not method.needs_training:  # trained methods run on their own weights, checked when built
            method.check_model(backbone.model)
    transform = datasets.eval_transform(backbone.model, protocol)
    ds = datasets.build_dataset(dataset, split, transform, data_root)
    if strict and ds.unreadable:
        raise BenchError(f"{ds.unreadable} unreadable images in {dataset}/{split} (drop --strict to skip)")
    baseline_added = "none" not in method_objects and reducible(backbone.model)
    if baseline_added:  # Δ top-1 and speedups always have the dense model of the same setting to refer to
        method_objects = {"none": get_method("none"), **method_objects}
    results_path = Path(out) / distributed.results_name(shard_spec) if out is not None else None
    with contextlib.ExitStack() as held:  # the results file is ours until the sweep ends
        if results_path is not None and world.is_main:
            held.enter_context(results.exclusive(results_path))
        recorded = {row.cell_id: row for row in results.read_results(results_path)} if results_path else {}
        for turn in ("first", "others"):  # rank 0 fills the image store, then the other ranks read it
            if (turn == "first") == world.is_main:
                store = cache.load_images(ds, transform, cache_dir, strict, workers)
            distributed.barrier(world)
        images, _ = store.batch(0, min(len(store), batch_size))
        timing_images = timing_batch(images.flatten(0, 1) if ds.views > 1 else images, batch_size).to(chosen_device)
        video = getattr(transform, "protocol", None)  # video rows record their views, per-view GMACs and clips/s
        calibration = None
        if budget is not None or any(m.needs_calibration for m in method_objects.values()):
            if split == "val":
                raise BenchError("--budget and methods that calibrate on the val split (dvt) must be measured on "
                                 "another split")
            calibration = datasets.load_split(backbone.model, dataset, "val", data_root)
        env = results.provenance(chosen_device, seed)
        dense = budgets.dense_gmacs(backbone.model, calibration[0]) if budget is not None else None
        plan = plan_cells(method_objects, backbone, model, dataset, checkpoint, overrides, budget, calibration, dense,
                          log, one_named=len(names) == 1)
        plan = distributed.shard_of(plan, shard_spec, key=lambda cell: distributed.cell_sort_key(cell[0], cell[3]))
        log = log if world.is_main else (lambda *a, **k: None)

        cached = ("streamed, decoded at every configuration" if isinstance(store, cache.StreamedStore)
                  else "from the image cache" if store.cached else "decoded now")
        log(f"{len(plan)} configurations of {len(method_objects)} methods on {backbone.name} ({backbone.weights}), "
            f"{dataset}/{split} ({len(store)} images {cached}, {store.unreadable} unreadable), "
            f"{env['device_name']}, {dtype}, batch {batch_size}, {torch.get_num_threads()} threads"
            f"{f', {world.size} processes' if world.size > 1 else ''}"
            + (f" -> {results_path}" if results_path else ""))
        started = time.perf_counter()
        rows = []
        prefixes = held.enter_context(contextlib.closing(PrefixStore()))  # evaluation's shared dense prefixes
        for i, (name, method, loaded, point) in enumerate(plan, 1):
            cell = {"method": name, "knobs": point, "model": loaded.name, "weights": loaded.weights,
                    "dataset": dataset, "split": split, "device": chosen_device.type,
                    "device_name": env["device_name"], "dtype": dtype, "batch_size": batch_size,
                    "threads": torch.get_num_threads() if chosen_device.type == "cpu" else None, "seed": seed,
                    **({"protocol": str(video)} if video else {}),
                    **({"budget": budget} if budget is not None else {}),
                    **({"compile": True} if compile and timing else {})}
            cid = results.cell_id(cell)
            if cid in recorded and (recorded[cid].timed or not timing):
                log(f"[{i}/{len(plan)}] {name} {knob_label(point)}: already recorded, skipped")
                rows.append(recorded[cid])
                continue
            torch.manual_seed(seed)
            extra, calibration_provenance = {}, None
            if method.needs_calibration:  # from the calibration store when it holds this one
                origin = {"model": loaded.name, "weights": loaded.weights, "dataset": dataset, "split": "val"}
                extra["calibrated"], calibration_provenance = calibrations.calibrated(
                    method, loaded.model, calibration, point, recalibrate=recalibrate, origin=origin)
            built = method.build(loaded.model, **point, **extra).to(chosen_device).eval()
            start, stop = distributed.contiguous_slice(len(store), world)
            with reusing(prefixes) if chosen_device.type == "cpu" else contextlib.nullcontext():
                local = (measure.evaluate(built, store.batches(batch_size, start, stop), chosen_device, dtype, ds.views)
                         if stop > start else None)
            evaluation = distributed.gather(local, world)
            if not world.is_main:
                continue
            fields = {**cell, "cell_id": cid, "family": method.family, "needs_training": method.needs_training,
                      "baseline": True if baseline_added and name == "none" else None,
                      "n_unreadable": store.unreadable, "n_missing": ds.missing,
                      "params": measure.parameter_count(built), "trained_with": loaded.meta.get("trained_with"),
                      "calibration": calibration_provenance,
                      **evaluation.summary(), "provenance": env}
            if budget is not None:
                fields.update(budget_achieved=fields["gmacs"] / dense)
            if video:
                fields.update(views=ds.views, gmacs_per_view=fields["gmacs"] / ds.views, throughput_unit="clips/s",
                              cls_substitute=getattr(built, "cls_substitute", None))
            if timing:
                fields.update(timing_fields(built, timing_images, dtype, repeats, compile))
            fields["nonfinite_weights"] = not all(torch.isfinite(p).all() for p in built.parameters())
            if fields["nonfinite_logits"] or fields["nonfinite_weights"]:
                print(f"tokenbench: warning: {name} {knob_label(point)}: {fields['nonfinite_logits']} images with "
                      f"NaN or inf logits{'; NaN or inf weights' if fields['nonfinite_weights'] else ''}",
                      file=sys.stderr)
            row = results.ResultRow.from_dict(fields)
            if results_path is not None:
                results.append_result(results_path, row)
            rows.append(row)
            unit = "clips/s" if video else "img/s"
            speed = f", {row.throughput:.0f} {unit}, {row.latency_ms:.2f} ms at batch 1" if timing else ""
            speed += " (noisy: machine busy?)" if row.timing_noisy else ""
            eta = (time.perf_counter() - started) / i * (len(plan) - i)  # from this run's pace so far
            log(f"[{i}/{len(plan)}] {name} {knob_label(point)}: top-1 {100 * row.top1:.2f}%, "
                f"{row.gmacs:.4g} GMACs{speed}" + (f" (about {eta:.0f} s left)" if i < len(plan) else ""))
        log(f"done in {time.perf_counter() - started:.1f} s" + (f"; {results_path}" if results_path else ""))
        return results.rows_frame(rows)
