"""The method registry: built-in and third-party methods, both found through one entry-point group.

A method is a `Method` subclass named in the `tokenbench.methods` entry-point group (tokenbench's own
`pyproject.toml` lists the built-ins exactly as a plugin package lists its own). Its `knobs` say what the
sweep varies, with default sweep values, the no-op value that must reproduce the dense model and the
valid range; `build` turns a backbone into the model the harness measures. Knob values are checked here,
once, for the command line and the Python API alike, with the same messages.

This module imports no torch, so that listing methods and parsing arguments start fast.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from tokenbench.errors import BenchError

if TYPE_CHECKING:
    import torch.nn as nn

ENTRY_POINT_GROUP = "tokenbench.methods"
FAMILIES = ("none", "prune", "merge", "early-exit")

# Options of the harness's commands. A knob becomes an option of `bench`, `profile`, `visualize` and
# `train` under its own name, so it may not take one of these (tests/test_cli.py keeps the list complete).
HARNESS_OPTIONS = frozenset({
    "array_parallelism", "backbone", "baseline", "batch_size", "batch_sizes", "budget", "budgets", "cache_dir",
    "cell", "checkpoint", "checkpoints", "cifar10_root", "cluster", "command", "compile", "count", "cpus_per_task",
    "data_root", "dataset", "device", "dtype", "epochs", "gpus_per_node", "help", "image", "images", "init", "jobs",
    "lr", "method", "methods", "model", "name", "no_timing", "nodes", "out", "pairs", "part", "plot", "pretrained", "probe",
    "protocol", "quick", "recipe", "repeats", "results", "resume", "reuse", "rounds", "run", "seed", "shard", "slurm_account",
    "slurm_partition", "snapshot", "split", "strict", "submitit", "submitit_folder", "threads", "timeout_min",
    "tolerance", "update", "warmup", "warmup_epochs", "workers",
})


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, numbers.Real) and not isinstance(value, bool) else str(value)


def knob_label(knobs: dict) -> str:
    """'r=13 inflect=0', or '-' without knobs: how every table, log line and plot names a setting."""
    return " ".join(f"{k}={format_value(v)}" for k, v in knobs.items()) or "-"


@dataclass(frozen=True)
class Knob:
    """One budget knob of a method: its sweep values, its no-op value and its valid range."""

    name: str
    sweep: tuple
    noop: Any
    kind: type = float
    low: float = -math.inf
    high: float = math.inf
    low_inclusive: bool = False
    help: str = ""
    choices: tuple = ()  # a knob that names a variant (DVT's exit criterion) rather than a number

    def __post_init__(self):
        if self.choices and (self.kind is not str or self.noop not in self.choices
                             or not set(self.sweep) <= set(self.choices)):
            raise BenchError(f"knob {self.name!r}: a choice knob has kind str and its no-op and sweep among its choices")

    @property
    def flag(self) -> str:
        """The command-line option: `--keep`, `--sample-rate`."""
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any, method: str) -> Any:
        """`value` as this knob's type, or a BenchError saying why it is not a valid setting of `method`."""
        if self.choices:
            if value not in self.choices:
                raise BenchError(f"{method}: {self.name}={value!r} is not one of {', '.join(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise BenchError(f"{method}: {self.name}={value!r} is not a number")
        if self.kind is int:
            if not float(value).is_integer():
                raise BenchError(f"{method}: {self.name}={format_value(value)} is not a whole number")
            value = int(value)
        else:
            value = self.kind(value)
        if value == self.noop:  # always valid, even outside the range (ATS: inf switches it off)
            return value
        low_ok = value >= self.low if self.low_inclusive else value > self.low
        if not (low_ok and value <= self.high) or value != value:
            lo = "[" if self.low_inclusive else "("
            raise BenchError(f"{method}: {self.name}={format_value(value)} is outside "
                             f"{lo}{format_value(self.low)}, {format_value(self.high)}]")
        return value

    def parse(self, text: str, method: str) -> Any:
        """One value from its command-line text, checked."""
        try:
            value = self.kind(text.strip())
        except ValueError:
            raise BenchError(f"{method}: {self.name}={text.strip()!r} is not a valid {self.kind.__name__}") from None
        return self.validate(value, method)

    def parse_values(self, given, method: str) -> tuple:
        """Sweep values from '0.9,0.7' (the command line) or [0.9, 0.7] (Python): checked, duplicates dropped,
        order kept, each exactly as given (no float arithmetic)."""
        if isinstance(given, str):
            values = [self.parse(v, method) for v in given.split(",") if v.strip()]
        else:
            values = [self.validate(v, method) for v in given]
        if not values:
            raise BenchError(f"{method}: {self.name} {given!r} gives no values")
        return tuple(dict.fromkeys(values))


def keep_rate_knob(sweep=(0.9, 0.8, 0.7, 0.6, 0.5), help="fraction of patch tokens kept at each reduction stage"):
    return Knob("keep", tuple(sweep), noop=1.0, kind=float, low=0.0, high=1.0, help=help)


class Method:
    """Base class of a token-reduction method plugin."""

    name: ClassVar[str]
    family: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    needs_training: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False  # build() takes calibration=(images, labels) of a held-out split,
    # or calibrated=calibrate(...)'s result
    batch_invariant: ClassVar[bool] = True  # an image's result does not depend on the other images in its batch
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        """A subclass's own `build` checks the model first (`check_model`), wherever it is called from, so an
        unsupported backbone gets the one-line reason before the method reads anything of it."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("build")
        if own is not None and not getattr(own, "checks_model", False):
            @functools.wraps(own)
            def build(self, model, *args, **knobs):
                self.check_model(model)
                return own(self, model, *args, **knobs)

            build.checks_model = True
            cls.build = build

    def check_model(self, model: nn.Module) -> None:
        """Raise a one-line BenchError, with the reason, if this method cannot run on `model`. The default
        (every block-level method): a timm ViT whose tokens can be reduced."""
        from tokenbench.tokens import check_vit

        check_vit(model)

    def build(self, model: nn.Module, **knobs: Any) -> nn.Module:
        """Return the model to measure: `model` with this method applied at the given knob values."""
        raise NotImplementedError

    def calibrate(self, model: nn.Module, calibration, **knobs: Any) -> dict:
        """What a `needs_calibration` method chooses on held-out `calibration` = (images, labels) at `knobs`
        (DVT's exit thresholds, DiffRate's rates), as plain data: `build(..., calibrated=that)` uses it as is,
        and `tokenbench calibrate` prints it."""
        raise NotImplementedError(f"{self.name} does not calibrate")

    def checkpoint_for(self, model_name: str, dataset: str):
        """Trained weights shipped for this method on (model, dataset), or None. Only for `needs_training`."""
        return None

    def attach(self, model: nn.Module) -> nn.Module:
        """Add the method's learned modules to `model` (DynamicViT's predictors), so its checkpoints load."""
        return model

    def training_loss(self, model: nn.Module, **knobs: Any):
        """(module to train, loss_fn(module, images, labels, label_smoothing) or None for cross-entropy).

        The default fine-tunes the backbone with the method in place at `knobs`; the module shares its weights.
        """
        return self.build(model, **knobs), None

    @classmethod
    def noop_knobs(cls) -> dict[str, Any]:
        return {k.name: k.noop for k in cls.knobs}

    @classmethod
    def own_knobs(cls, names) -> dict[str, Knob]:
        """This method's knobs by name, or a BenchError for a name in `names` it does not have."""
        own = {k.name: k for k in cls.knobs}
        for name in names:
            if name not in own:
                raise BenchError(f"{cls.name} has no knob {name!r} (its knobs: {', '.join(own) or 'none'})")
        return own

    @classmethod
    def check_knobs(cls, given: dict[str, Any], default: str = "noop") -> dict[str, Any]:
        """Every knob's value, checked: those `given`, the others at their no-op (or first sweep) value."""
        cls.own_knobs(given)
        return {k.name: k.validate(given[k.name], cls.name) if k.name in given
                else (k.noop if default == "noop" else k.sweep[0]) for k in cls.knobs}

    @classmethod
    def parse_knobs(cls, texts: dict[str, str]) -> dict[str, Any]:
        """{knob name: value} from command-line texts, each checked by this method's own knob."""
        own = cls.own_knobs(texts)
        return {name: own[name].parse(text, cls.name) for name, text in texts.items()}

    @classmethod
    def sweep_points(cls, overrides: dict[str, tuple] | None = None) -> list[dict[str, Any]]:
        """The knob settings of a sweep: the main (first) knob over its values; every other knob at its first
        sweep value unless given, and then over every value given (`--cost 0.2,0.3 --criterion confidence,random`
        is four settings)."""
        overrides = overrides or {}
        if not cls.knobs:
            return [{}]
        main, *rest = cls.knobs
        values = overrides.get(main.name, main.sweep)
        others = [overrides[k.name] if k.name in overrides else k.sweep[:1] for k in rest]
        return [{main.name: v, **dict(zip((k.name for k in rest), combo))}
                for combo in itertools.product(*others) for v in values]


_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    """Add a Method subclass to the registry under `cls.name` (entry points do this for installed packages)."""
    where = f"{cls.__module__}.{cls.__qualname__}"
    if getattr(cls, "family", None) not in FAMILIES:
        raise BenchError(f"{where}.family must be one of {FAMILIES}, not {getattr(cls, 'family', None)!r}")
    for knob in cls.knobs:
        if not knob.name.isidentifier() or knob.name in HARNESS_OPTIONS:
            raise BenchError(f"{where}: knob {knob.name!r} would shadow the harness option {knob.flag}; rename it")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and (existing.__module__, existing.__qualname__) != (
            cls.__module__, cls.__qualname__):
        raise BenchError(f"{where}: method name {cls.name!r} is taken by "
                         f"{existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin is named, not a traceback
            raise BenchError(f"method plugin {ep.name!r} ({ep.value}) failed to import: {err}") from None
        if not (isinstance(obj, type) and issubclass(obj, Method)):
            raise BenchError(f"method plugin {ep.name!r} ({ep.value}) is not a tokenbench Method subclass")
        register_method(obj)
    if "none" not in _REGISTRY:
        raise BenchError("no built-in methods found: tokenbench is not installed (pip install -e . in its checkout)")


def all_methods() -> dict[str, type[Method]]:
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise BenchError(f"unknown method {name!r}; known methods: {', '.join(methods)}")
    return methods[name]()


def resolve_methods(spec: str) -> list[str]:
    """`all` or a comma-separated list of method names, validated, duplicates dropped."""
    known = all_methods()
    if spec.strip() == "all":
        return list(known)
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise BenchError(f"no method named in {spec!r}; known methods: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise BenchError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return names


def knob_by_name() -> dict[str, Knob]:
    """Every knob name used by a registered method (first definition wins for the help text)."""
    out: dict[str, Knob] = {}
    for cls in all_methods().values():
        for knob in cls.knobs:
            out.setdefault(knob.name, knob)
    return out


def knob_overrides(methods: list[str], given: dict) -> dict[str, tuple]:
    """Sweep values ({knob name: 'v,v' or a list}), checked by each of `methods` that has the knob.

    A knob none of `methods` has is an error, so a typo never silently runs the default sweep.
    """
    out = {}
    for name, text in given.items():
        owners = [m for m in methods if any(k.name == name for k in all_methods()[m].knobs)]
        if not owners:
            raise BenchError(f"{name!r} is not a knob of {', '.join(methods)}")
        for owner in owners:
            knob = next(k for k in all_methods()[owner].knobs if k.name == name)
            out[name] = knob.parse_values(text, owner)
    return out
