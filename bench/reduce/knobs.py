"""Knobs: what a method's sweep varies, each with its default sweep, its no-op value and its valid range,
checked here once for the command line and the Python API alike (with the same messages). No torch."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from tokenbench.errors import BenchError


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
    sweep_only: bool = False  # only the no-op and the sweep values exist (LTMP: one set of thresholds each)

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
        if self.sweep_only and value not in self.sweep:
            raise BenchError(f"{method}: {self.name}={format_value(value)} is not one of its settings "
                             f"({', '.join(map(format_value, self.sweep))}, or the no-op {format_value(self.noop)})")
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
    """The `keep` knob of keep-rate methods: a fraction in (0, 1], no-op 1."""
    return Knob("keep", tuple(sweep), noop=1.0, kind=float, low=0.0, high=1.0, help=help)
