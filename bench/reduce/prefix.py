"""Dense-prefix reuse: the blocks before a model's first reduction compute the same tokens for every method on
the same backbone and images, so a sweep computes them once per batch and depth instead of once per configuration.

Active only inside `reusing(store)`, which the sweep opens around each evaluation on the CPU (never around timing:
a timed forward always runs every block; on a GPU the prefix is cheap next to the memory it would hold). A stored
prefix is used only when the backbone module, its parameters (identity and in-place version), autocast and the
images (a digest of their bytes) all match, so the tokens are those the blocks would compute, bit for bit; the
ledger is charged the skipped blocks' MACs as if they ran.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn

from tokenbench.reduce.fingerprint import parameter_versions, tensor_digest

STORE_BYTES = 2 * 2**30  # stored tokens at most; past it, prefixes are computed as usual and not kept

_ACTIVE: list["PrefixStore"] = []


class PrefixStore:
    """Tokens after the first `depth` plain blocks, per (backbone, images): {key: {depth: tokens}}."""

    def __init__(self, max_bytes: int = STORE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.entries: dict[tuple, dict[int, torch.Tensor]] = {}
        self._watched: dict[int, weakref.finalize] = {}

    def key(self, vit: nn.Module, images: torch.Tensor) -> tuple | None:
        """What the prefix's tokens depend on, or None where the parameters keep no version."""
        params = parameter_versions(vit)
        if params is None:
            return None
        autocast = (torch.is_autocast_enabled(images.device.type), torch.get_autocast_dtype(images.device.type))
        return id(vit), params, autocast, images.device, tensor_digest([images])

    def nearest(self, key: tuple, depth: int) -> tuple[int, torch.Tensor | None]:
        """(d, tokens) with the largest stored d <= depth, or (0, None)."""
        stored = self.entries.get(key, {})
        best = max((d for d in stored if d <= depth), default=0)
        if not best:
            return 0, None
        self.hits += 1
        return best, stored[best].clone()

    def keep(self, vit: nn.Module, key: tuple, depth: int, tokens: torch.Tensor) -> None:
        size = tokens.numel() * tokens.element_size()
        if self.bytes + size > self.max_bytes or depth in self.entries.get(key, {}):
            return
        if id(vit) not in self._watched:  # a backbone that is freed takes its prefixes with it (its id is reused)
            self._watched[id(vit)] = weakref.finalize(vit, self.forget, id(vit))
        self.entries.setdefault(key, {})[depth] = tokens.clone()
        self.bytes += size

    def forget(self, vit_id: int) -> None:
        for key in [k for k in self.entries if k[0] == vit_id]:
            self.bytes -= sum(t.numel() * t.element_size() for t in self.entries.pop(key).values())
        self._watched.pop(vit_id, None)

    def close(self) -> None:
        for finalizer in self._watched.values():
            finalizer.detach()
        self.entries.clear()
        self._watched.clear()
        self.bytes = 0


def active_store() -> PrefixStore | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def reusing(store: PrefixStore):
    """Within this block, `TokenReducedViT` forwards share their dense prefixes through `store`, which keeps
    them for the next time it is active (the sweep activates it for evaluation only, never for timing)."""
    _ACTIVE.append(store)
    try:
        yield store
    finally:
        _ACTIVE.remove(store)
