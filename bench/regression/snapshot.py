"""The regression gate: catch a change that alters what a method computes or makes it slower.

Two parts, both covering every registered method automatically:

- **Exact** (hard gate): tokens entering each block, ledger GMACs and FlopCounterMode GMACs of every
  method at every default sweep point, on two fixed random-init models (`vit_digits` and DeiT-S shapes,
  seeded weights and inputs, one CPU thread), must equal the committed snapshot. Methods that calibrate
  on held-out images (DVT) run their shipped weights on the embedded digits instead. Any change fails with a
  table of what changed. The FlopCounterMode column catches compute a method forgets to put on the ledger.
- **Speed** (wall-clock, noise-aware): each method's speedup over the dense timm model at the middle
  point of its sweep, measured in one process at one thread with the two interleaved (AB, BA, ...),
  median and IQR over several pairs. Shared machines are too noisy to compare absolute times from run to
  run, but a ratio measured in one run is stable (about 3% IQR at one thread, engineering notes §2.3).
  It fails when the median speedup falls below `1 - tolerance` times the committed baseline (keyed by
  device, torch version and threads), or when a method the baseline found faster than dense is now
  slower than dense. A fixed matmul workload timed before and after calibrates for contention: a
  loaded machine is retried, then reported as inconclusive instead of failing.

`tokenbench regression --update` rewrites both files deliberately.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from tokenbench.data import registry as datasets
from tokenbench.errors import BenchError
from tokenbench.measure import calibrations
from tokenbench.models import loading as models
from tokenbench.reduce.knobs import knob_label
from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import Method

REGRESSION_DIR = Path("results") / "regression"
SNAPSHOT_NAME, BASELINE_NAME = "snapshot.json", "speed-baseline.json"
UPDATE_COMMAND = "tokenbench regression --update"

SEED = 0
SNAPSHOT_MODELS = {"vit_digits": 4, "deit_small_patch16_224": 2}  # model -> images per forward
CALIBRATION_DATASET = "digits"  # real held-out images for methods that calibrate (DVT's exit thresholds)
REL_TOL = 1e-9  # "exact": only float summation order may differ



@contextlib.contextmanager
def threads(n: int):
    """Run torch ops on `n` threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def regression_folder(start: Path | None = None) -> Path:
    """`results/regression` of the project being checked: in the working directory or the nearest parent
    that has one (the repository, run from any folder inside it), else the working directory's."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / REGRESSION_DIR).is_dir():
            return folder / REGRESSION_DIR
    return start / REGRESSION_DIR


def random_model(name: str, seed: int = SEED) -> nn.Module:
    """`name` with seeded random-init weights (never the embedded or pretrained ones), in eval mode."""
    torch.manual_seed(seed)
    return models.create(name).eval()


def random_images(model: nn.Module, batch: int, seed: int = SEED) -> torch.Tensor:
    return torch.randn(batch, *models.input_shape(model), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- exact


def snapshot_entry(method: Method, backbone: nn.Module, images: torch.Tensor, knobs: dict) -> dict:
    """What one method computes at `knobs`: tokens per block and GMACs per image (ledger and FlopCounterMode).

    A method that needs training gets fresh, seeded trainable parts (e.g. token predictors) on a copy of
    the backbone through its own `training_loss` hook, so its compute is covered without trained weights.
    """
    torch.manual_seed(SEED)
    try:
        model = method.build(method.with_fresh_parts(backbone), **knobs).eval()
    except BenchError as err:  # the method does not apply to this model (recorded, so a change shows)
        return {"error": str(err)}
    return entry_of(model, images)


def entry_of(model: nn.Module, images: torch.Tensor) -> dict:
    ledger = measure_gmacs(model, images)
    return {
        "tokens": [round(float(t), 6) for t in ledger.tokens_per_block().mean(dim=0)],
        "gmacs": float(ledger.gmacs.mean()),
        "fcm_gmacs": flop_counter_gmacs(model, images) / images.shape[0],
    }


def calibrated_inputs(method: Method, model_name: str, batch: int):
    """(model, calibration, images) for a method that calibrates on held-out images (DVT's exit thresholds,
    DiffRate's rate search), or an error entry where no real weights are shipped.

    Random weights and noise would make every image leave at the same exit, or give the search nothing to
    learn, so such a method is checked on real data: its checkpoint for `model_name` (a method that trains)
    or the model's embedded weights on the embedded digits, calibrated on their val split and measured on
    the first `batch` test images.
    """
    if method.needs_training:
        checkpoint = method.checkpoint_for(model_name, CALIBRATION_DATASET)
    else:
        checkpoint = models.asset(models.EMBEDDED_WEIGHTS[model_name]) if model_name in models.EMBEDDED_WEIGHTS else None
    if checkpoint is None:
        return {"error": f"{method.name} ships no weights for {model_name} on {CALIBRATION_DATASET}"}
    model = models.load_model(checkpoint=checkpoint).model
    calibration = datasets.load_split(model, CALIBRATION_DATASET, "val")
    images, _ = datasets.load_split(model, CALIBRATION_DATASET, "test")
    return model, calibration, images[:batch]


def calibrated_entry(method: Method, inputs, knobs: dict) -> dict:
    if isinstance(inputs, dict):
        return inputs
    model, calibration, images = inputs
    torch.manual_seed(SEED)
    settings, _ = calibrations.calibrated(method, model, calibration, knobs)  # shipped: the same on every torch
    return entry_of(method.build(model, **knobs, calibrated=settings).eval(), images)


def take_snapshot(methods: dict[str, type[Method]], model_batches: dict[str, int] | None = None) -> dict:
    """{model: {method: {sweep point: entry}}} for every method at every default sweep point, at one thread."""
    out = {}
    with threads(1):
        for model_name, batch in (model_batches or SNAPSHOT_MODELS).items():
            backbone = random_model(model_name)
            images = random_images(backbone, batch)
            out[model_name] = {}
            for name, cls in methods.items():
                method = cls()
                if cls.needs_calibration:
                    inputs = calibrated_inputs(method, model_name, 4 * batch)
                    entries = {knob_label(k): calibrated_entry(method, inputs, k) for k in cls.sweep_points()}
                else:
                    entries = {knob_label(k): snapshot_entry(method, backbone, images, k) for k in cls.sweep_points()}
                out[model_name][name] = entries
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.9g}"
    if isinstance(value, list):
        return "[" + " ".join(f"{v:g}" for v in value) + "]"
    return "-" if value is None else str(value)


def compare_snapshots(expected: dict, actual: dict) -> list[list[str]]:
    """Rows (model, method, point, field, snapshot, now) for every difference; empty when identical.

    Only the methods in `actual` are compared, so `--methods` checks a subset.
    """
    rows = []
    for model_name, methods in actual.items():
        known = expected.get(model_name, {})
        for name, points in methods.items():
            if name not in known:
                rows.append([model_name, name, "*", "*", "(not in snapshot)", "new method"])
                continue
            for point in sorted(set(points) | set(known[name])):
                was, now = known[name].get(point), points.get(point)
                if was is None:
                    rows.append([model_name, name, point, "*", "(not in snapshot)", "new sweep point"])
                    continue
                if now is None:
                    rows.append([model_name, name, point, "*", "(in snapshot)", "sweep point gone"])
                    continue
                for key in sorted(set(was) | set(now)):
                    if not _same(was.get(key), now.get(key)):
                        rows.append([model_name, name, point, key, _show(was.get(key)), _show(now.get(key))])
    return rows


# ---------------------------------------------------------------------------------------------- speed


def read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BenchError(f"{path} is not valid JSON ({err}); regenerate it with {UPDATE_COMMAND}") from None


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
