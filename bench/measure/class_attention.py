"""Is class attention informative? Keep the most, spread, random or least class-attended tokens, block by block.

Top-k's premise (EViT, and the baselines of DynamicViT's ablation) is that the class token's attention ranks
patch tokens by importance. Where it does, keeping the most attended tokens beats keeping random ones and
keeping the least attended loses most. `probe` measures this at each of top-k's reduction blocks alone and at
all of them together (which is `topk` itself, with `random` beside it), on the same images, each order against
random with the paired 95% interval and McNemar's p: a board's top-k-against-random ranking explained by a
measurement of the backbone, block by block. `tokenbench class-attention` prints it.

`spread` keeps by the same score, the top of every 2x2 window of the grid first (at one block alone, where the
tokens are still the grid): where it beats `most`, what top-k lacks is coverage of the image, not a better
ranking. `gap` says where the kept tokens lie: the mean distance (in patches) from an input patch to the nearest
patch still held by a token after the last of the blocks, 0 where nothing is dropped. Keeping half of an 8×8 grid
at random leaves a patch about half a patch from a kept one on average; a set clustered on one region leaves the
rest of the image further away.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from tokenbench.measure.metrics import evaluate
from tokenbench.measure.stats import delta_ci, mcnemar
from tokenbench.reduce import KeepRateReducer, Need, TokenReducedViT, reduction_stages

ORDERS = ("most", "spread", "random", "least")
GAP_IMAGES = 1000  # the gap is averaged over the first images: a trace holds a patch map per token


class ClassAttentionOrder(KeepRateReducer):
    """Keep the patch tokens the class token attends to most (top-k's score), least, at random, or `spread`: the
    most attended of every 2x2 window of the patch grid first (at keep 0.5, the top two of each window), so the
    same score keeps tokens all over the image. `spread` needs the full grid: the first reduction only."""

    needs = Need.CLS_ATTN

    def __init__(self, keep_rate: float, order: str, generator: torch.Generator, grid: tuple[int, int] = (0, 0)):
        super().__init__(keep_rate)
        self.order, self.generator, self.grid = order, generator, grid

    def score(self, x, state, info):
        attention = info.cls_attn[:, :, state.prefix:].mean(dim=1)  # [images, patches], each below 1
        if self.order == "random":
            return torch.rand(attention.shape, generator=self.generator).to(attention.device)
        if self.order == "spread":
            return attention - rank_in_window(attention, self.grid)  # window rank first, then attention
        return attention if self.order == "most" else -attention


def rank_in_window(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Each patch's rank (0: highest score) among the four of its 2x2 window of the row-major `grid`."""
    (b, n), (rows, cols) = scores.shape, grid
    if n != rows * cols:
        raise ValueError(f"{n} tokens are not the {rows}x{cols} grid: the spread order ranks the first reduction only")
    windows = scores.reshape(b, rows // 2, 2, cols // 2, 2).transpose(2, 3).reshape(b, -1, 4)
    rank = windows.argsort(-1, descending=True).argsort(-1).to(scores.dtype)
    return rank.reshape(b, rows // 2, cols // 2, 2, 2).transpose(2, 3).reshape(b, n)


def correct_per_image(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> np.ndarray:
    """Top-1 right or not per image, by the harness's own evaluation (`tokenbench.measure.metrics.evaluate`)."""
    batches = ((images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size))
    return evaluate(model, batches, torch.device("cpu")).correct


def nearest_kept_gap(model: nn.Module, reducers: dict, images: torch.Tensor, batch_size: int) -> float:
    """Mean grid distance from each input patch to the nearest patch a token still holds after the last reduction."""
    rows, cols = model.patch_embed.grid_size
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).float()
    distance = torch.cdist(grid, grid)  # [patch, patch]
    reduced, gaps = TokenReducedViT(model, reducers), []
    for i in range(0, min(len(images), GAP_IMAGES), batch_size):
        stages = reduced.trace(images[i:min(i + batch_size, GAP_IMAGES)])
        if not stages:  # no block changed the tokens
            return 0.0
        held = (stages[-1][1] > 0).any(1)  # [images, patches]
        gaps.append(distance.masked_fill(~held[:, None, :], float("inf")).amin(-1).mean(-1))
    return float(torch.cat(gaps).mean())


def probe(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, keep: float = 0.5, batch_size: int = 250,
          seed: int = 0) -> pd.DataFrame:
    """One line per (blocks, order): top-1 (%) keeping `keep` of the patch tokens by that order after attention in
    those blocks, the kept tokens' `gap`, and the difference from random there in points (95% interval,
    McNemar's p); dense first."""
    model = model.eval()
    stages, grid = reduction_stages(model, keep), tuple(model.patch_embed.grid_size)
    tiled = all(side % 2 == 0 for side in grid)
    dense = correct_per_image(model, images, labels, batch_size)
    lines = [{"blocks": "none (dense)", "order": "-", "top-1 %": 100 * dense.mean(), "gap": 0.0}]
    for blocks in [(b,) for b in stages] + [tuple(stages)]:
        generator = torch.Generator().manual_seed(seed)
        correct, gap = {}, {}
        orders = [o for o in ORDERS if o != "spread" or (len(blocks) == 1 and tiled)]
        for order in orders:
            reducers = {b: ClassAttentionOrder(keep, order, generator, grid) for b in blocks}
            correct[order] = correct_per_image(TokenReducedViT(model, reducers), images, labels, batch_size)
            gap[order] = nearest_kept_gap(model, reducers, images, batch_size)
        for order in orders:
            line = {"blocks": "/".join(map(str, blocks)), "order": order, "top-1 %": 100 * correct[order].mean(),
                    "gap": gap[order]}
            if order != "random":
                low, high = delta_ci(correct[order], correct["random"])
                line.update({"minus random": 100 * (correct[order].mean() - correct["random"].mean()),
                             "95% low": low, "95% high": high, "McNemar p": mcnemar(correct[order], correct["random"])})
            lines.append(line)
    return pd.DataFrame(lines)
