"""Schedules shared by methods: EViT's keep count, the clustering methods' stages, the papers' blocks."""

from __future__ import annotations

import math

import torch

from tokenbench.reduce.contract import AttentionInfo, Prune, TokenReducer, TokenState


class KeepRateReducer(TokenReducer):
    """Keep ceil(keep_rate * n) of the n patch tokens with the highest `score` (EViT's schedule).

    Subclasses define `score(x, state, info) -> [B, n]`. Keeping every token is a no-op that leaves the
    token order alone, so the dense result is reproduced exactly.
    """

    def __init__(self, keep_rate: float):
        super().__init__()
        self.keep_rate = keep_rate

    def score(self, x: torch.Tensor, state: TokenState, info: AttentionInfo) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, x, state, info):
        n = x.shape[1] - state.prefix
        k = keep_count(self.keep_rate, n)
        if k == n:
            return None
        return Prune(keep=self.score(x, state, info).topk(k, dim=1).indices)


def keep_count(keep_rate: float, n: int) -> int:
    """EViT's rule: ceil(keep_rate * n) of the n current patch tokens (n includes an earlier fused token)."""
    return min(n, math.ceil(keep_rate * n))


def stage_counts(n_patches: int, keep_rate: float, stages: int = 3) -> list[int]:
    """Tokens kept at each reduction stage by the clustering methods' rule (TokenReduction, ATC):
    int(n_patches * keep_rate ** s) for s = 1, 2, 3, always of the original patches (0.7 of 196: 137, 96, 67)."""
    return [max(1, int(n_patches * keep_rate ** (s + 1))) for s in range(stages)]


def default_reduction_blocks(depth: int) -> tuple[int, ...]:
    """The papers' stages: blocks 3, 6, 9 of a 12-block model (every quarter of the depth, 0-indexed)."""
    step = depth // 4
    return (step, 2 * step, 3 * step) if step else ()


def reduction_stages(model, keep: float) -> dict[int, int]:
    """The papers' stages of `model` at keep rate `keep`: {block index: patch tokens the clustering methods'
    rule leaves there (`stage_counts`)}; empty at keep >= 1, the no-op. Keep-rate methods use its blocks."""
    if keep >= 1:
        return {}
    blocks = default_reduction_blocks(len(model.blocks))
    patches = getattr(model.patch_embed, "num_patches", None)  # None: a model whose grid is set per input
    return {b: None for b in blocks} if patches is None else dict(zip(blocks, stage_counts(patches, keep)))
