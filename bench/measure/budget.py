"""Matched compute: for each method, the knob value whose GMACs are at most a fraction F of dense.

`tokenbench bench --budget F` compares methods at equal cost instead of at equal knob values. The
search walks a method's main knob (the one its sweep varies; other knobs keep their first sweep value)
over candidate values ordered from the no-op outward, along which the cost only goes down, and bisects
for the first candidate within budget: the one that spends the most of it. Fixed-rate methods (top-k,
EViT, ToMe) cost the same on every image, so one image decides. Adaptive methods (ATS: per-image GMACs
that vary) are calibrated on the held-out images given, and their achieved budget, measured afterwards
on the evaluation split, can land slightly off F; results rows record both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tokenbench.errors import BenchError
from tokenbench.reduce.knobs import Knob, knob_label
from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import Method, get_method

FLOAT_STEP = 0.005  # grid of a fractional knob: finer than one token of 196 for keep rates
PROBE_IMAGES = 8  # images that tell a fixed-rate method (same cost on each) from an adaptive one
CALIBRATION_IMAGES = 256  # held-out images an adaptive method is calibrated on


@dataclass
class BudgetChoice:
    knobs: dict
    gmacs: float  # mean GMACs per image on the calibration images
    adaptive: bool  # the cost varied between calibration images
    evaluations: int  # knob values tried


def candidates(knob: Knob, model: nn.Module) -> list:
    """Values of `knob` from its no-op outward, so that cost does not increase along the list."""
    if knob.sweep_only:  # LTMP's targets: the no-op, then the sweep from the one nearest it
        return [knob.noop, *sorted(knob.sweep, key=lambda v: abs(v - knob.noop))]
    if knob.kind is int and knob.noop == knob.low:  # e.g. ToMe's r: 0, 1, 2, ... (nothing changes past the patches)
        return list(range(int(knob.noop), int(knob.noop) + model.patch_embed.num_patches + 1))
    if knob.kind is float and knob.noop >= knob.high:  # keep rates: 1, 0.995, ... (ATS: inf, then 1, 0.995, ...)
        top = knob.high if knob.noop == knob.high else max(knob.sweep)
        grid = [round(top - i * FLOAT_STEP, 6) for i in range(int(round((top - max(knob.low, 0.0)) / FLOAT_STEP)))]
        grid = [v for v in grid if v > knob.low or (knob.low_inclusive and v == knob.low)]
        return ([knob.noop] if knob.noop != top else []) + grid
    if knob.kind is float and knob.noop == knob.low:  # fractions removed (vid-TLDR's r): 0, 0.005, ... below 1
        top = min(knob.high, 1.0)
        return [round(knob.noop + i * FLOAT_STEP, 6) for i in range(int(round((top - knob.noop) / FLOAT_STEP)))]
    raise BenchError(f"cannot search knob {knob.name!r} for a budget: its no-op is not at an end of its range")


class Cost:
    """Mean GMACs per image of `method` at given knob values on `images`, remembered per value."""

    def __init__(self, method: Method, model: nn.Module, images: torch.Tensor, fixed: dict, extra: dict,
                 batch_size: int):
        self.method, self.model, self.images, self.fixed, self.extra = method, model, images, fixed, extra
        self.batch_size = batch_size
        self.known: dict = {}
        self.adaptive = False

    def __call__(self, name: str, value) -> float:
        if value not in self.known:
            torch.manual_seed(0)
            model = self.method.build(self.model, **{**self.fixed, name: value}, **self.extra).eval()
            per_image = torch.cat([measure_gmacs(model, self.images[i:i + self.batch_size]).gmacs
                                   for i in range(0, len(self.images), self.batch_size)])
            self.adaptive |= bool(per_image.min() != per_image.max())
            self.known[value] = per_image.mean().item()
        return self.known[value]


def buildable_count(values: list, cost) -> int:
    """How many of `values` (no-op first, cheaper onwards) the method can build: a setting too cheap to exist
    (DVT below its first exit's cost) raises BenchError, and so does every cheaper one, so bisect for the
    first that does."""
    def builds(value) -> bool:
        try:
            cost(value)
            return True
        except BenchError:
            return False

    if builds(values[-1]):
        return len(values)
    good, bad = 0, len(values) - 1  # the no-op always builds
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if builds(values[mid]) else (good, mid)
    return good + 1


def search_knobs(method: Method, model: nn.Module, fraction: float, images: torch.Tensor, dense_gmacs: float,
                 extra: dict | None = None, batch_size: int = 64) -> BudgetChoice:
    """The knobs of `method` that spend the most of `fraction` x `dense_gmacs` without exceeding it."""
    if not method.knobs:
        built = method.build(model, **(extra or {})).eval()
        return BudgetChoice({}, measure_gmacs(built, images[:1]).gmacs.mean().item(), False, 1)
    fixed = method.sweep_points()[0]
    knob = method.knobs[0]
    values = candidates(knob, model)
    limit = fraction * dense_gmacs
    cost = Cost(method, model, images[:PROBE_IMAGES], fixed, extra or {}, batch_size)
    cost(knob.name, fixed[knob.name])  # at a typical setting: does the cost vary between images?
    cost.adaptive |= method.needs_calibration  # early exit: a few probe images may all leave at one exit
    if cost.adaptive:  # calibrate on every held-out image
        cost.images, cost.known = images, {}
    else:  # fixed-rate: every image costs the same, one decides
        cost.images = images[:1]
    values = values[:buildable_count(values, lambda value: cost(knob.name, value))]
    if cost(knob.name, values[-1]) > limit:
        raise BenchError(f"{method.name} cannot reach {fraction:g} x dense ({limit:.4g} GMACs): "
                         f"its least is {cost.known[values[-1]]:.4g} GMACs at {knob.name}={values[-1]:g}")
    low, high = -1, len(values) - 1  # values[high] is within budget; values[low] is not (or is before the list)
    while high - low > 1:
        mid = (low + high) // 2
        if cost(knob.name, values[mid]) <= limit:
            high = mid
        else:
            low = mid
    chosen = values[high]
    return BudgetChoice({**fixed, knob.name: chosen}, cost.known[chosen], cost.adaptive, len(cost.known))


def spread(images: torch.Tensor, count: int) -> torch.Tensor:
    """`count` images evenly spaced over the split, not its first ones: a split stored class by class
    (CIFAR-10's val split begins with 256 airplanes) would calibrate an adaptive method on one class."""
    if len(images) <= count:
        return images
    return images[torch.linspace(0, len(images) - 1, count).round().long()]


def dense_gmacs(model: nn.Module, images: torch.Tensor) -> float:
    """GMACs per image of the dense model (the same on every image)."""
    return measure_gmacs(get_method("none").build(model), images[:1]).gmacs.item()


def matched_points(method: Method, model: nn.Module, fraction: float, calibration: tuple, dense: float,
                   log=print) -> list[dict]:
    """The knob settings `bench --budget` measures for `method`: the matched one, or none if it cannot
    get within budget (said why). A method without knobs (the dense model) is measured as it is."""
    if not fraction > 0:
        raise BenchError(f"--budget {fraction:g} must be positive (a fraction of the dense GMACs)")
    extra = {"calibration": calibration} if method.needs_calibration else {}
    # A calibrated method (DVT) sets its thresholds on the whole held-out split and its cost is their mean
    # over it: measured on a few images, a biased subset could pass a setting that overspends.
    held_out = calibration[0] if method.needs_calibration else spread(calibration[0], CALIBRATION_IMAGES)
    try:
        choice = search_knobs(method, model, fraction, held_out, dense, extra)
    except BenchError as err:
        log(f"{method.name}: skipped, {err}")
        return []
    how = f"calibrated on {len(held_out)} held-out images" if choice.adaptive else "fixed rate"
    label = knob_label(choice.knobs) if choice.knobs else "as is"
    log(f"{method.name}: {label} for budget {fraction:g} x dense: {choice.gmacs:.4g} GMACs "
        f"({choice.gmacs / dense:.3f} x dense, {how}, {choice.evaluations} values tried)")
    return [choice.knobs]
