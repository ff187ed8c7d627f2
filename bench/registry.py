"""The method registry: built-in plugins in `methods/`, third-party ones through an entry point.

A method is a `Method` subclass decorated with `@register_method`. Its `knobs` say what the sweep varies
(with default sweep values and the no-op value that must reproduce the dense model); `build` turns a
backbone into the model the harness measures. Block-level reducers patch a timm ViT through
`bench.tokens.TokenReducedViT`; model-level methods (a cascade with early exit) return their own module.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn as nn

ENTRY_POINT_GROUP = "tokenbench.methods"
FAMILIES = ("none", "prune", "merge", "early-exit")


class BenchError(Exception):
    """A user error: the CLI prints it as one line and exits non-zero."""


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

    def convert(self, text: str) -> Any:
        """The value of a command-line string, type-checked only (each method checks its own range)."""
        try:
            return self.kind(text)
        except ValueError:
            raise BenchError(f"--{self.name}: {text!r} is not a valid {self.kind.__name__}") from None

    def parse(self, text: str) -> Any:
        value = self.convert(text)
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        low_ok = value >= self.low if self.low_inclusive else value > self.low
        if not (low_ok and value <= self.high):
            lo = "[" if self.low_inclusive else "("
            raise BenchError(f"--{self.name} {value:g} is outside {lo}{self.low:g}, {self.high:g}]")


def keep_rate_knob(sweep=(0.9, 0.8, 0.7, 0.6, 0.5), help="fraction of patch tokens kept at each reduction stage"):
    return Knob("keep", tuple(sweep), noop=1.0, kind=float, low=0.0, high=1.0, help=help)


class Method:
    """Base class of a token-reduction method plugin."""

    name: ClassVar[str]
    family: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    needs_training: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False  # build() takes calibration=(images, labels) of a held-out split
    summary: ClassVar[str] = ""

    def build(self, model: nn.Module, **knobs: Any) -> nn.Module:
        """Return the model to measure: `model` with this method applied at the given knob values."""
        raise NotImplementedError

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
    def sweep_points(cls, overrides: dict[str, tuple] | None = None) -> list[dict[str, Any]]:
        """The knob settings of the default sweep (one knob varies; the others stay at their first value)."""
        overrides = overrides or {}
        if not cls.knobs:
            return [{}]
        main, *rest = cls.knobs
        values = overrides.get(main.name, main.sweep)
        fixed = {k.name: overrides.get(k.name, k.sweep)[0] for k in rest}
        return [{main.name: v, **fixed} for v in values]


_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass to the registry under `cls.name`."""
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}, not {cls.family!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("methods")  # built-ins register themselves on import
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Method) and obj.name not in _REGISTRY:
            register_method(obj)


def all_methods() -> dict[str, type[Method]]:
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise BenchError(f"unknown method {name!r}; known methods: {', '.join(methods)}")
    return methods[name]()


def resolve_methods(spec: str) -> list[str]:
    """`all` or a comma-separated list of method names, validated."""
    known = all_methods()
    if spec == "all":
        return list(known)
    names = [s.strip() for s in spec.split(",") if s.strip()]
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

