"""The Python API: apply a method to your own model, count its GMACs, evaluate it, sweep methods.

The command line is a thin layer over these functions (`tokenbench bench` is `sweep`), and both check
knob values with the same code and messages.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
import torch.nn as nn

from tokenbench.data import registry as datasets
from tokenbench.data.images import batches, preload
from tokenbench.errors import BenchError
from tokenbench.measure import calibrations
from tokenbench.measure import metrics as measure
from tokenbench.models import loading as models
from tokenbench.reduce.knobs import knob_label
from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import all_methods, get_method, knob_overrides
from tokenbench.run.sweep import check_options, sweep, timing_batch, timing_fields

__all__ = ["apply", "calibrate", "evaluate", "gmacs", "load_images", "load_model", "method_table", "sweep"]


def load_model(name: str | None = None, checkpoint: str | None = None, pretrained: bool = False) -> nn.Module:
    """A timm model by name (with the embedded weights for tokenbench's own models), in eval mode.

    `checkpoint`: a local weights file (read with weights_only=True; a tokenbench checkpoint names its
    model); `pretrained`: timm's pretrained weights (needs the hub or its cache). As `--model`,
    `--checkpoint` and `--pretrained` of the command line.
    """
    return models.load_model(name, checkpoint, pretrained).model


def load_images(model: nn.Module, dataset: str = "digits", split: str = "test",
                data_root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a dataset split through `model`'s eval preprocessing, decoded once: (images, labels)."""
    return datasets.load_split(model, dataset, split, data_root)


def apply(model: nn.Module, method: str, calibration: tuple | None = None, **knobs) -> nn.Module:
    """`model` (a timm ViT) with `method` applied at `knobs`; knobs not given take their no-op value.

    The result shares the model's weights and leaves it untouched. Knob names and values are checked as
    on the command line: `apply(vit, "topk", keep=1.5)` raises BenchError("topk: keep=1.5 is outside (0, 1]").
    A method that calibrates (DiffRate's rate search, DVT's thresholds) takes `calibration` = (images, labels)
    of a held-out split, and says so when a setting needs it; what it chooses there is kept in the calibration
    store and reused while the model, the images and the knobs are the same (`tokenbench.measure.calibrations`).
    """
    chosen = get_method(method)
    knobs = chosen.check_knobs(knobs)
    if not chosen.needs_calibration:
        if calibration is not None:
            raise BenchError(f"{method} does not calibrate: calibration= has nothing to choose")
        return chosen.build(model, **knobs).eval()
    if calibration is None:
        return chosen.build(model, **knobs).eval()  # the method says when it needs one
    settings, _ = calibrations.calibrated(chosen, model, calibration, knobs)  # reused while inputs are the same
    return chosen.build(model, **knobs, calibrated=settings).eval()


def calibrate(model: nn.Module, method: str, dataset: str = "digits", *, split: str = "val",
              data_root: str | None = None, **knobs) -> pd.DataFrame:
    """What a calibrating method chooses on a held-out split, one row per setting (knob values or lists of them,
    else its default sweep): the chosen settings as `Method.calibrate` returns them, the seconds it took, and the
    result on that split: GMACs per image (and as a fraction of dense) and top-1."""
    chosen = get_method(method)
    if not chosen.needs_calibration:
        raise BenchError(f"{method} does not calibrate: nothing of it is chosen on held-out images")
    images, labels = load_images(model, dataset, split, data_root)
    noop = chosen.noop_knobs()
    unreduced = chosen.build(model, **noop, calibrated=chosen.calibrate(model, (images, labels), **noop)).eval()
    dense = float(gmacs(unreduced, images[:1])[0])  # the method at its no-op setting: the dense model, every exit
    rows = []
    for point in chosen.sweep_points(knob_overrides([method], knobs)):
        torch.manual_seed(0)
        start = time.perf_counter()
        settings = chosen.calibrate(model, (images, labels), **point)
        seconds = time.perf_counter() - start
        built = chosen.build(model, **point, calibrated=settings).eval()
        result = measure.evaluate(built, batches(images, labels, 64), torch.device("cpu"), "fp32", 1).summary()
        rows.append({"method": method, "setting": knob_label(point), **settings, "calibration_s": round(seconds, 1),
                     "gmacs": result["gmacs"], "gmacs_fraction": result["gmacs"] / dense,
                     "top1": result["top1"], "dataset": dataset, "split": split, "images": len(labels)})
    return pd.DataFrame(rows)


def _ledger_ready(model: nn.Module) -> nn.Module:
    """A model whose blocks record their cost: `model` itself (what `apply` returned, or a trained cascade),
    or a plain timm model wrapped as the dense method, which refuses a backbone it cannot count in one line."""
    plain_timm = hasattr(model, "pretrained_cfg") and not hasattr(model, "forward_exits")
    return get_method("none").build(model) if plain_timm else model


def gmacs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """GMACs per image ([B], float64) of the computation `model` actually runs on `images`.

    `model` is what `apply` returned, or a plain timm ViT (counted dense). One multiply-add is one MAC.
    """
    ledger = measure_gmacs(_ledger_ready(model).eval(), images)
    return ledger.gmacs


def evaluate(model: nn.Module, dataset: str = "digits", *, split: str = "test", data_root: str | None = None,
             protocol: str | None = None, device: str = "cpu", dtype: str = "fp32", batch_size: int | None = None,
             timing: bool = False, repeats: int = 7) -> pd.DataFrame:
    """Top-1/top-5 and per-image GMACs of one ready model (from `apply`) on a dataset: a one-row DataFrame.

    The images go through the model's own eval preprocessing. With `timing`, throughput at the batch size
    and batch-1 latency are measured too, as the sweep does. For sweeps and resumable results, use `sweep`.
    """
    chosen, batch_size = check_options(device, dtype, split, batch_size, repeats)
    model = _ledger_ready(model).to(chosen).eval()
    backbone = getattr(model, "vit", model)
    transform = datasets.eval_transform(backbone, protocol)
    ds = datasets.build_dataset(dataset, split, transform, data_root)
    images, labels = preload(ds.dataset)
    row = {"dataset": dataset, "split": split, "n_unreadable": ds.unreadable,
           **measure.evaluate(model, batches(images, labels, batch_size), chosen, dtype, ds.views).summary(),
           "params": measure.parameter_count(model)}
    if timing:
        flat = images.flatten(0, 1) if ds.views > 1 else images
        row.update(timing_fields(model, timing_batch(flat, batch_size).to(chosen), dtype, repeats))
    return pd.DataFrame([row])


def method_table() -> pd.DataFrame:
    """Every registered method (plugins included): family, knobs with default sweep and no-op, training, module."""
    rows = []
    for name, cls in all_methods().items():
        rows.append({"method": name, "family": cls.family,
                     "knobs": {k.name: {"sweep": k.sweep, "noop": k.noop} for k in cls.knobs},
                     "default sweep": "; ".join(knob_label(p) for p in cls.sweep_points()),
                     "needs_training": cls.needs_training, "summary": cls.summary, "module": cls.__module__})
    return pd.DataFrame(rows).set_index("method")
