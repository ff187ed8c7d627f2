"""tokenbench: one harness for token-reduction methods on Vision Transformers.

The Python API (see the README): `load_model`, `load_images`, `apply`, `gmacs`, `evaluate`, `calibrate`, `sweep`
and `methods()`. They load torch and timm on first use, so that importing tokenbench (and starting its command
line) stays fast. A method's author imports from `tokenbench.reduce`.
"""

import importlib
import importlib.metadata

from tokenbench.errors import BenchError
from tokenbench.reduce.knobs import Knob, keep_rate_knob, knob_label
from tokenbench.reduce.registry import Method, get_method, register_method

__version__ = importlib.metadata.version("tokenbench")
__all__ = ["BenchError", "Knob", "Method", "apply", "calibrate", "evaluate", "get_method", "gmacs", "keep_rate_knob",
           "knob_label", "load_images", "load_model", "methods", "register_method", "sweep"]
_API = {"apply", "calibrate", "evaluate", "gmacs", "load_images", "load_model", "sweep"}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("tokenbench.api"), name)
    if name == "methods":  # the subpackage of built-in methods, callable: tokenbench.methods() lists them all
        return importlib.import_module("tokenbench.methods")
    raise AttributeError(f"module 'tokenbench' has no attribute {name!r}")
