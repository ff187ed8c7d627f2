"""The engine, and the method author's surface: everything a method may import, and nothing more.

A method decides (`Prune`, `Merge`, `Propagate`, `Gate`) in a `TokenReducer`; the engine (`attention`, `block`,
`ops`, `vit`) applies the decision once for every method and keeps the FLOP ledger (`ledger`) and the traces. `Method`,
`Knob` and `register_method` (`registry`) make a method known to the harness. The names below are the
whole surface (docs/writing-a-method.md documents them; a test holds every built-in method to them). They
load on first use, so that `import tokenbench.reduce.registry` (the command line's start) costs no torch.
"""

import importlib

SURFACE = {
    "contract": ["AttentionInfo", "Decision", "Gate", "Merge", "Need", "Position", "Propagate", "Prune", "TokenReducer",
                 "TokenState"],
    "vit": ["TokenReducedViT", "classify"],
    "schedules": ["KeepRateReducer", "default_reduction_blocks", "keep_count", "reduction_stages", "stage_counts"],
    "ops": ["gather_tokens", "with_prefix"],
    "attention": ["mean_attention_received", "run_attention"],
    "ledger": ["BlockCost", "CostLedger", "active_ledger", "embed_macs", "linear_macs_per_token",
               "norm_macs_per_token"],
    "knobs": ["Knob", "keep_rate_knob"],
    "fingerprint": ["parameter_versions", "tensor_digest"],
    "registry": ["Method", "register_method"],
}
_HOME = {name: module for module, names in SURFACE.items() for name in names} | {"BenchError": None}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'tokenbench.reduce' has no attribute {name!r}")
    module = "tokenbench.errors" if _HOME[name] is None else f"tokenbench.reduce.{_HOME[name]}"
    return getattr(importlib.import_module(module), name)
