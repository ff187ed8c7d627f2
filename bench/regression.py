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
import copy
import datetime
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tokenbench import datasets, measure, models
from tokenbench.errors import BenchError
from tokenbench.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.registry import Method, all_methods, knob_label
from tokenbench.results import cpu_name
from tokenbench.harness import preload

REGRESSION_DIR = Path("results") / "regression"
SNAPSHOT_NAME, BASELINE_NAME = "snapshot.json", "speed-baseline.json"
UPDATE_COMMAND = "tokenbench regression --update"

SEED = 0
SNAPSHOT_MODELS = {"vit_digits": 4, "deit_small_patch16_224": 2}  # model -> images per forward
CALIBRATION_DATASET = "digits"  # real held-out images for methods that calibrate (DVT's exit thresholds)
REL_TOL = 1e-9  # "exact": only float summation order may differ

TOLERANCE = 0.2  # fail below (1 - TOLERANCE) x the baseline speedup
FASTER = 1.1  # a baseline speedup above this means "expected faster than dense"
CONTENDED = 1.5  # calibration this many times slower than its baseline: the machine is loaded


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


def select_methods(names: list[str] | None) -> dict[str, type[Method]]:
    known = all_methods()
    if not names:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown method {unknown[0]!r}; known methods: {', '.join(known)}")
    return {n: known[n] for n in names}


# ---------------------------------------------------------------------------------------------- exact


def snapshot_entry(method: Method, backbone: nn.Module, images: torch.Tensor, knobs: dict) -> dict:
    """What one method computes at `knobs`: tokens per block and GMACs per image (ledger and FlopCounterMode).

    A method that needs training gets fresh, seeded trainable parts (e.g. token predictors) on a copy of
    the backbone through its own `training_loss` hook, so its compute is covered without trained weights.
    """
    torch.manual_seed(SEED)
    try:
        if method.needs_training:
            backbone = copy.deepcopy(backbone)
            method.training_loss(backbone)
        model = method.build(backbone, **knobs).eval()
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
    transform = datasets.eval_transform(model)
    calibration = preload(datasets.build_dataset(CALIBRATION_DATASET, "val", transform).dataset)
    images, _ = preload(datasets.build_dataset(CALIBRATION_DATASET, "test", transform).dataset)
    return model, calibration, images[:batch]


def calibrated_entry(method: Method, inputs, knobs: dict) -> dict:
    if isinstance(inputs, dict):
        return inputs
    model, calibration, images = inputs
    torch.manual_seed(SEED)
    return entry_of(method.build(model, **knobs, calibration=calibration).eval(), images)


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


@dataclass(frozen=True)
class SpeedSetup:
    """The fixed CPU setup the speed part measures on (recorded with the baseline)."""

    model: str = "vit_digits"  # random-init; the same for every method
    batch: int = 16
    threads: int = 1
    pairs: int = 15  # interleaved (dense, method) timing pairs per method
    sample_s: float = 0.1  # each timed sample runs the forward enough times to last about this long
    warmup_s: float = 0.3


@dataclass
class Speed:
    """A method's speedup over dense: the median and IQR of the per-pair ratios."""

    knobs: dict
    speedup: float
    iqr: float
    pairs: int
    dense_ms: float
    method_ms: float


def speed_point(cls: type[Method]) -> dict:
    """The knobs a method is timed at: the middle point of its default sweep."""
    points = cls.sweep_points()
    return points[len(points) // 2]


def calibration_seconds(samples: int = 5) -> float:
    """Median time of a fixed workload (a 256x256 matmul loop): slow when the CPU is shared."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(SEED))
    times = []
    with torch.inference_mode():
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(20):
                a @ a
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_speedup(dense: nn.Module, model: nn.Module, x: torch.Tensor, setup: SpeedSetup, pairs: int) -> tuple:
    """(median ratio, IQR, dense s, method s) of dense time / method time over interleaved pairs."""
    times, _ = measure.interleaved_seconds([dense, model], x, repeats=pairs, warmup_rounds=1,
                                           warmup_s=setup.warmup_s, min_repeat_s=setup.sample_s)
    ratio, iqr = measure.speedups(times)
    return float(ratio[1]), float(iqr[1]), statistics.median(times[:, 0]), statistics.median(times[:, 1])


def timed_models(cls: type[Method], setup: SpeedSetup):
    """(dense, method model, images, knobs) to time a method with, or why it is not timed.

    Dense and method share weights: seeded random init, or the method's shipped checkpoint when it
    needs training (without one it is skipped: its speed may depend on trained weights). Methods that
    calibrate on real images (early-exit thresholds) are skipped too.
    """
    method = cls()
    if cls.needs_calibration:
        return "chooses its settings on real held-out images (thresholds, rates); the speed part runs on random ones"
    if cls.needs_training:
        checkpoint = method.checkpoint_for(setup.model, "digits")
        if checkpoint is None:
            return f"needs trained weights; no checkpoint shipped for {setup.model}"
        dense = models.load_model(checkpoint=checkpoint).model
    else:
        dense = random_model(setup.model)
    knobs = speed_point(cls)
    torch.manual_seed(SEED)
    try:
        model = method.build(dense, **knobs).eval()
    except BenchError as err:
        return f"does not apply to {setup.model}: {err}"
    return dense, model, random_images(dense, setup.batch), knobs


def measure_speeds(methods: dict[str, type[Method]], setup: SpeedSetup, pairs: int | None = None,
                   log=print) -> dict[str, Speed | str]:
    """Speedup over dense for each method (or the reason it was skipped), at `setup.threads` threads."""
    pairs = pairs or setup.pairs
    out: dict[str, Speed | str] = {}
    with threads(setup.threads):
        for name, cls in methods.items():
            timed = timed_models(cls, setup)
            if isinstance(timed, str):
                out[name] = timed
                log(f"  {name}: skipped, {timed}")
                continue
            dense, model, x, knobs = timed
            ratio, iqr, d, m = interleaved_speedup(dense, model, x, setup, pairs)
            out[name] = Speed(knobs, ratio, iqr, pairs, d * 1e3, m * 1e3)
            log(f"  {name} {knob_label(knobs)}: {ratio:.3f}x (IQR {iqr:.3f}) dense {d * 1e3:.1f} ms, "
                f"method {m * 1e3:.1f} ms")
    return out


def same_setup(recorded: dict, setup: SpeedSetup) -> bool:
    """Whether a baseline was measured on the same model, batch and threads (effort settings may differ)."""
    return all(recorded.get(k) == getattr(setup, k) for k in ("model", "batch", "threads"))


def baseline_key(setup: SpeedSetup) -> str:
    """Speedups are only compared on the device, torch version and thread count they were measured with."""
    return f"{cpu_name()} | torch {torch.__version__} | {setup.threads} thread{'s' if setup.threads > 1 else ''}"


@dataclass
class Verdict:
    method: str
    knobs: str
    baseline: float | None
    now: float | None
    iqr: float | None
    status: str  # ok, faster, SLOWER, no baseline, skipped: ...

    @property
    def failed(self) -> bool:
        return self.status.startswith("SLOWER")

    def row(self) -> list:
        change = f"{self.now / self.baseline - 1:+.1%}" if self.now is not None and self.baseline else "-"
        now = f"{self.now:.3f} ± {self.iqr:.3f}" if self.now is not None else "-"
        base = f"{self.baseline:.3f}" if self.baseline is not None else "-"
        return [self.method, self.knobs, base, now, change, self.status]


def judge(name: str, speed: Speed | str, base: dict | None, tolerance: float | None = TOLERANCE) -> Verdict:
    """Compare one measured speedup with its baseline entry ({"knobs", "speedup"}) or say why it cannot be.

    With `tolerance` None (a baseline from another device) only "now slower than dense" is checked.
    """
    if isinstance(speed, str):
        return Verdict(name, "-", base and base["speedup"], None, None, f"skipped: {speed}")
    label = knob_label(speed.knobs)
    if base is None:
        return Verdict(name, label, None, speed.speedup, speed.iqr, f"no baseline (run {UPDATE_COMMAND})")
    if base["knobs"] != speed.knobs:
        return Verdict(name, label, None, speed.speedup, speed.iqr,
                       f"baseline timed at {knob_label(base['knobs'])} (run {UPDATE_COMMAND})")
    was = base["speedup"]
    if was > FASTER and speed.speedup < 1.0:
        status = "SLOWER than dense"
    elif tolerance is not None and speed.speedup < (1 - tolerance) * was:
        status = f"SLOWER (> {tolerance:.0%} drop)"
    elif tolerance is not None and speed.speedup > (1 + tolerance) * was:
        status = "faster"
    else:
        status = "ok"
    return Verdict(name, label, was, speed.speedup, speed.iqr, status)


@dataclass
class SpeedReport:
    verdicts: list[Verdict]
    inconclusive: str | None = None  # why the measurement could not be trusted
    calibration_s: list[float] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.inconclusive is None and any(v.failed for v in self.verdicts)


def speed_gate(methods: dict[str, type[Method]], baseline: dict, reference_s: float | None,
               setup: SpeedSetup = SpeedSetup(), tolerance: float | None = TOLERANCE, retries: int = 2,
               wait_s: float = 20.0, log=print) -> SpeedReport:
    """Measure, compare with `baseline` ({method: {"knobs", "speedup"}}), re-measure failures once.

    The calibration workload is timed before measuring, before a re-measurement and after it; if it
    runs more than CONTENDED times slower than `reference_s` (its time when the baseline was recorded),
    the machine is loaded: wait and retry up to `retries` times, then give up as inconclusive rather
    than report noise as a regression. Without a reference nothing is detected.
    """
    calibrations = []

    def quiet(retry: bool) -> bool:
        attempts = retries + 1 if retry else 1
        for attempt in range(attempts):
            with threads(setup.threads):
                calibrations.append(calibration_seconds())
            if reference_s is None or calibrations[-1] <= CONTENDED * reference_s:
                return True
            wait = attempt + 1 < attempts
            log(f"calibration {calibrations[-1] * 1e3:.1f} ms vs {reference_s * 1e3:.1f} ms at baseline: "
                f"machine loaded{f', waiting {wait_s:.0f} s' if wait else ''}")
            if wait:
                time.sleep(wait_s)
        return False

    loaded = f"the machine is loaded (calibration > {CONTENDED:.1f}x its baseline time)"
    if not quiet(retry=True):
        return SpeedReport([], loaded, calibrations)
    speeds = measure_speeds(methods, setup, log=log)
    verdicts = {n: judge(n, s, baseline.get(n), tolerance) for n, s in speeds.items()}
    failing = {n: methods[n] for n, v in verdicts.items() if v.failed}
    if failing:
        log(f"re-measuring {', '.join(failing)} with {2 * setup.pairs} pairs before calling it a regression")
        if not quiet(retry=True):
            return SpeedReport(list(verdicts.values()), loaded, calibrations)
        again = measure_speeds(failing, setup, pairs=2 * setup.pairs, log=log)
        verdicts.update({n: judge(n, s, baseline.get(n), tolerance) for n, s in again.items()})
        if any(v.failed for v in verdicts.values()) and not quiet(retry=False):
            return SpeedReport(list(verdicts.values()), loaded + " after measuring", calibrations)
    return SpeedReport(list(verdicts.values()), None, calibrations)


def baseline_entry(speeds: dict[str, Speed | str], setup: SpeedSetup, calibration_s: float) -> dict:
    """What `--update` stores for this device: the setup, the calibration time and each method's speedup."""
    return {
        "recorded_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": asdict(setup),
        "calibration_s": calibration_s,
        "methods": {n: {"knobs": s.knobs, "speedup": round(s.speedup, 4), "iqr": round(s.iqr, 4), "pairs": s.pairs,
                        "dense_ms": round(s.dense_ms, 3), "method_ms": round(s.method_ms, 3)}
                    for n, s in speeds.items() if isinstance(s, Speed)},
        "skipped": {n: s for n, s in speeds.items() if isinstance(s, str)},
    }


# ---------------------------------------------------------------------------------------------- files


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
