"""The calibration store: what a method derives from held-out data before it runs (DiffRate's searched rates,
DVT's exit thresholds), computed once and reused while what produced it is the same.

A calibration is keyed by a content hash of its inputs: the method's name and `calibration_version`, its
knobs, the model's weights and the calibration images and labels. It is looked up, in order:

1. shipped with tokenbench (`methods/calibrations/METHOD/KEY.json`, for the embedded models' default sweep
   and the regression snapshot; `tokenbench calibrate --write-shipped` regenerates them), used whatever the
   torch version, so those results do not move with it;
2. the user cache (`TOKENBENCH_CACHE` or the user cache folder, `calibrations/METHOD/KEY-ENV.json`), whose key
   also holds the torch and timm versions and the device, since a search's result depends on them (the same
   search on two CPU generations can round differently and end elsewhere);
3. else computed, and written to the user cache atomically.

A file is trusted only if it parses, names the key it is stored under, and its settings match their
checksum; anything else is recomputed with a warning (a truncated file, edited counts, another model's file).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.resources
import json
import os
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

from tokenbench.data.store import cache_root
from tokenbench.measure.results import device_name
from tokenbench.reduce.fingerprint import tensor_digest
from tokenbench.reduce.registry import Method

FORMAT = 1


def weights_digest(model: nn.Module) -> str:
    state = model.state_dict()
    h = hashlib.sha256("".join(state).encode())  # the names, then the tensors
    h.update(tensor_digest(state.values()).encode())
    return h.hexdigest()


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def environment(model: nn.Module) -> dict:
    """What a calibration's result depends on besides its inputs: library versions and the device it ran on."""
    device = next(model.parameters()).device
    return {"torch": torch.__version__, "timm": timm.__version__, "machine": device_name(device)}


def shipped_folder(method: str) -> Path:
    return Path(str(importlib.resources.files("tokenbench.methods") / "calibrations" / method))


def user_folder(method: str) -> Path:
    return cache_root() / "calibrations" / method


def keyed(method: Method, model: nn.Module, calibration, knobs: dict) -> tuple[dict, dict, str]:
    """(every knob, checked; the inputs a calibration depends on; their key)."""
    knobs = method.check_knobs(knobs)
    images, labels = calibration
    inputs = {"method": method.name, "calibration_version": method.calibration_version, "knobs": knobs,
              "weights_sha256": weights_digest(model), "data_sha256": tensor_digest([images, labels]),
              "images": len(labels)}
    return knobs, inputs, digest(inputs)[:20]


def read_record(path: Path, key: str) -> dict | None:
    """The settings stored at `path` if it is a sound record of `key`; None if absent; a warning if unsound."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        sound = (record["format"] == FORMAT and record["key"] == key
                 and digest(record["settings"]) == record["settings_sha256"])
    except (ValueError, KeyError, TypeError):
        sound = False
    if not sound:
        print(f"tokenbench: warning: {path} is not a sound calibration for key {key} (truncated, edited or "
              "another's); recomputing it", file=sys.stderr)
        return None
    return record


def write_record(path: Path, record: dict) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def calibrated(method: Method, model: nn.Module, calibration, knobs: dict, *, recalibrate: bool = False,
               origin: dict | None = None) -> tuple[dict, dict]:
    """(settings, provenance): `method.calibrate(model, calibration, **knobs)`, from the store when it holds it.

    provenance = {"key", "source": "shipped" | "loaded" | "computed", "seconds"} goes into the results row.
    `origin` (model name, weights, dataset, split) is recorded in the file for people, not part of the key.
    """
    knobs, inputs, key = keyed(method, model, calibration, knobs)
    user_path = user_folder(method.name) / f"{key}-{digest([key, environment(model)])[:12]}.json"
    if not recalibrate:
        for source, path in (("shipped", shipped_folder(method.name) / f"{key}.json"), ("loaded", user_path)):
            record = read_record(path, key)
            if record is not None:
                return record["settings"], {"key": key, "source": source, "seconds": record["seconds"]}
    record = compute(method, model, calibration, knobs, inputs, key, origin)
    write_record(user_path, record)
    return record["settings"], {"key": key, "source": "computed", "seconds": record["seconds"]}


def compute(method: Method, model: nn.Module, calibration, knobs: dict, inputs: dict, key: str,
            origin: dict | None) -> dict:
    start = time.perf_counter()
    settings = method.calibrate(model, calibration, **knobs)
    return {"format": FORMAT, "key": key, **inputs, "settings": settings, "settings_sha256": digest(settings),
            "seconds": round(time.perf_counter() - start, 2), "origin": origin or {}, **environment(model),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def ship(method: Method, model: nn.Module, calibration, knobs: dict, origin: dict) -> Path:
    """Compute a calibration afresh and write it among the shipped ones (`tokenbench calibrate --write-shipped`)."""
    knobs, inputs, key = keyed(method, model, calibration, knobs)
    path = shipped_folder(method.name) / f"{key}.json"
    write_record(path, compute(method, model, calibration, knobs, inputs, key, origin))
    return path


def stored() -> list[dict]:
    """Every calibration in the user cache: method, key, knobs, seconds, created, file."""
    out = []
    for path in sorted((cache_root() / "calibrations").glob("*/*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            record = {}
        out.append({"method": path.parent.name, "key": record.get("key", "?"), "knobs": record.get("knobs"),
                    "seconds": record.get("seconds"), "created": record.get("created"), "file": str(path)})
    return out


def shipped_model(method: Method):
    """The loaded model a shipped calibration of `method` is made on: the embedded digits model, or for a method
    trained with its own model (DVT) its shipped digits weights."""
    from tokenbench.models import loading as models

    return models.load_model(checkpoint=method.checkpoint_for("vit_digits", "digits") if method.needs_training
                             else models.asset(models.EMBEDDED_WEIGHTS["vit_digits"]))


def ship_point(method_name: str, knobs: dict) -> Path:
    """Compute and ship one calibration of the default sweep: `method_name` at `knobs` on `shipped_model`
    (the digits val split), which the quick start's sweep and the regression snapshot use."""
    from tokenbench.data.registry import load_split
    from tokenbench.reduce.registry import get_method

    method = get_method(method_name)
    loaded = shipped_model(method)
    origin = {"model": loaded.name, "weights": loaded.weights, "dataset": "digits", "split": "val"}
    torch.manual_seed(0)  # as the sweep and the snapshot do before building
    return ship(method, loaded.model, load_split(loaded.model, "digits", "val"), knobs, origin)


def write_shipped(method_names: list[str], log=print) -> list[Path]:
    """Recompute and ship the calibrations of `method_names` at every point of their default sweep."""
    from tokenbench.reduce.registry import get_method

    written = []
    for name in method_names:
        for point in get_method(name).sweep_points():
            written.append(ship_point(name, point))
            log(f"{name} {point}: {written[-1]}")
    return written
