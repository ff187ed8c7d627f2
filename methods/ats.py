"""ATS: adaptive token sampling, so that each image keeps as many tokens as its content needs.

In every block from the 4th on (blocks 3..11 of a 12-block model), each patch token gets a significance:
the class token's attention to it summed over heads, times the norm of its value vector (all heads
concatenated). Sorted ascending, the significances make a cumulative distribution, min-max normalised
to [0, 1]; K samples at evenly spaced levels from its smallest non-zero value to 1 each pick the token
whose cdf point is nearest (inverse transform sampling). Tokens picked several times are kept once, so
an image whose significance is concentrated keeps few tokens and a busy one keeps many. Only the kept
tokens are computed as queries of the block's attention (every token stays a key and value).
Knob: `sample_rate`, the samples per block as a fraction of the model's input patch tokens, K = ceil(sample_rate * P),
at every ATS block. sample_rate = 1 (K = 196 for DeiT-S) is the official DeiT-S configuration, where the
reduction comes from repeated picks alone; sample_rate = inf switches ATS off. The least significant
token is never picked, so no finite rate reproduces the dense model. (Not a per-stage keep fraction:
ATS keeps as many distinct tokens as the samples hit, hence its own knob name.)
Images keep different numbers of tokens: a batch is padded to its widest image and the padding is
masked out of attention, sampling and pooling, so an image's result does not depend on its batch (the
official code lets padding shift the normalised cdf; here it is normalised over real tokens only).
Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022 (official code:
adaptivetokensampling/ATS).
On a model without a class token (VideoMAE, average-pool ViTs) every token is a candidate and the attention
each token receives, averaged over all queries, stands in for the class token's attention
(`tokenbench.tokens.run_attention`: it needs the full attention map; results rows record the substitute).
"""

import math

import torch

from tokenbench.reduce import (
    Knob,
    Method,
    Need,
    Position,
    Prune,
    TokenReducedViT,
    TokenReducer,
    default_reduction_blocks,
    register_method,
)


def nearest_points(cdf: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """For each level, the index of the nearest value in the ascending rows of `cdf` (ties: the lower)."""
    right = torch.searchsorted(cdf, levels).clamp(max=cdf.shape[1] - 1)
    left = (right - 1).clamp(min=0)
    closer_left = levels - cdf.gather(1, left) <= cdf.gather(1, right) - levels
    return torch.where(closer_left, left, right)


class AdaptiveSamplingReducer(TokenReducer):
    needs = Need.CLS_ATTN | Need.VALUES
    position = Position.QUERIES

    def __init__(self, samples: int):
        super().__init__()
        self.samples = samples

    def decide(self, x, state, info):
        p = state.prefix
        B, H, N, d = info.values.shape
        value_norm = info.values.transpose(1, 2).reshape(B, N, H * d).norm(dim=-1)
        significance = (info.cls_attn.sum(dim=1) * value_norm)[:, p:]
        real = torch.ones_like(significance, dtype=torch.bool) if state.mask is None else state.mask[:, p:]
        # Padding sorts first (score -1) and gets cdf -inf: it is never picked and shifts nothing.
        sorted_significance, order = significance.masked_fill(~real, -1.0).sort(dim=1)
        cdf = sorted_significance.clamp(min=0).cumsum(dim=1)
        padding = (~real).sum(dim=1, keepdim=True)
        low, high = cdf.gather(1, padding), cdf[:, -1:]
        cdf = (cdf - low) / (high - low).clamp(min=torch.finfo(cdf.dtype).tiny)
        position = torch.arange(cdf.shape[1], device=cdf.device)
        cdf = cdf.masked_fill(position < padding, -math.inf)
        start = cdf.masked_fill(cdf <= 0, math.inf).amin(dim=1, keepdim=True).clamp(max=1.0)
        levels = start + (1 - start) * torch.linspace(0, 1, self.samples, device=cdf.device, dtype=cdf.dtype)
        picked = torch.zeros_like(real).scatter_(1, nearest_points(cdf, levels), True)
        # Picked positions first (in ascending significance), padded to the batch's widest image.
        counts = picked.sum(dim=1, keepdim=True)
        width = int(counts.max())
        slots = (~picked).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
        return Prune(keep=order.gather(1, slots), valid=torch.arange(width, device=cdf.device) < counts)


def ats_blocks(depth: int) -> range:
    """The official placement: every block from the first reduction stage on (3..11 for 12 blocks)."""
    stages = default_reduction_blocks(depth)
    return range(stages[0], depth) if stages else range(0)


@register_method
class ATS(Method):
    name = "ats"
    family = "prune"
    knobs = (Knob("sample_rate", (1.0, 0.7, 0.5, 0.3), noop=math.inf, kind=float, low=0.0, high=16.0,
                  help="ATS: samples per block as a fraction of the input patch tokens (1 = paper, inf = off, "
                       "at most 16)"),)
    summary = "adaptive token sampling in blocks 3..11: per-image token counts, padded and masked"

    def build(self, model, sample_rate=math.inf):
        if math.isinf(sample_rate):
            return TokenReducedViT(model)
        samples = math.ceil(sample_rate * model.patch_embed.num_patches)
        return TokenReducedViT(model, {i: AdaptiveSamplingReducer(samples) for i in ats_blocks(len(model.blocks))})
