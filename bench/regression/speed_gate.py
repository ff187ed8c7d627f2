"""The speed gate: each method's speedup over dense, timed in interleaved pairs, against a recorded baseline."""

from __future__ import annotations

import datetime
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from tokenbench.errors import BenchError
from tokenbench.measure import metrics as measure
from tokenbench.measure.metrics import pin_allocator
from tokenbench.measure.results import cpu_name
from tokenbench.models import loading as models
from tokenbench.reduce.knobs import knob_label
from tokenbench.reduce.registry import Method
from tokenbench.regression.snapshot import SEED, UPDATE_COMMAND, random_images, random_model, threads

TOLERANCE = 0.2  # fail below (1 - TOLERANCE) x the baseline speedup
FASTER = 1.1  # a baseline speedup above this means "expected faster than dense"
CONTENDED = 1.5  # calibration this many times slower than its baseline: the machine is loaded


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
    """Speedup over dense for each method (or the reason it was skipped), at `setup.threads` threads, with the
    allocator pinned (`pin_allocator`)."""
    pin_allocator()
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
