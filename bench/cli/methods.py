"""`tokenbench methods`: list every registered method with its family, knobs and default sweep."""

from __future__ import annotations

from tokenbench.reduce.knobs import format_value
from tokenbench.reduce.registry import declared_methods


def add_parser(sub):
    return sub.add_parser("methods", help="list the registered methods")


def describe(cls) -> list:
    knobs = "; ".join(f"{k.name} = {', '.join(format_value(v) for v in k.sweep)} (no-op {format_value(k.noop)})"
                      for k in cls.knobs)
    return [cls.name, cls.family, knobs or "-", "yes" if cls.needs_training else "no", cls.summary,
            cls.__module__]


def run(args):
    from tabulate import tabulate

    rows = [describe(cls) for cls in declared_methods().values()]
    print(tabulate(rows, headers=["method", "family", "knobs (default sweep)", "needs training", "what", "module"]))
    return 0
