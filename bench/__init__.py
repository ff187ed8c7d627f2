"""tokenbench: one harness for token-reduction methods on Vision Transformers."""

from bench.registry import BenchError, Knob, Method, keep_rate_knob, register_method

__all__ = ["BenchError", "Knob", "Method", "keep_rate_knob", "register_method"]
__version__ = "0.1.0"
