"""vid-TLDR: in the first blocks, merge tokens by ToMe's matching, each source weighted by its saliency.

After attention (and its residual) in blocks 0, 1 and 2, per image:
- saliency: each token's attention row (the softmax without the size bias, averaged over heads) scores
  sum_j a_ij log a_ij, sharper rows higher. Min-max normalised over the tokens; tokens below the mean are
  background (saliency 0); the rest are shifted by the mean and divided by the largest, so in [0, 1].
- matching: ToMe's bipartite matching on the block's output tokens (the residual stream, not the keys),
  cosine similarity mapped to (cos + 1) / 2; A = even positions, B = odd; the r best-matched A tokens go.
- merging: a merged token counts for saliency x its size, so B_j becomes
  (s_j x_j + sum_i e_i s_i x_i) / (s_j + sum_i e_i s_i) with that weighted size; a background token adds
  nothing (it is dropped). Later blocks use proportional attention (log size on the keys).
r = int(T x r) for r < 1, else r tokens, capped at half the candidates.
Choi et al., "vid-TLDR: Training Free Token merging for Light-weight Video Transformer", CVPR 2024 (official
code: mlvlab/vid-TLDR, `multi_modality/utils/vid_TLDR.py`).

Deviations:
- blocks: the official configs give r per block for their video-text models (UMT-B on MSR-VTT:
  600, 200, 100 tokens in blocks 0-2); tokenbench merges the same fraction r in blocks 0, 1 and 2, which
  no published image or small-video setting contradicts.
- prefix tokens (the class token of image ViTs, which the official video encoder lacks) are never
  merged, as in ToMe and in the class-token variant of the official functions (its first A row set to
  -inf); the A/B split is unchanged by it. Saliency is as official on the whole sequence: every token's
  full attention row (prefix columns included), normalised over all tokens, prefix tokens included.
- precision: the official merge casts the tokens to float32 whatever the model's dtype, and fails in
  float64 (its float64 saliency meets the float32 tokens in `scatter_reduce`); here it runs in the model's
  dtype, so a float64 model gives the float64 result.
The source trace follows the merge weights, as the official `source_trace` does: a merged token's patches
count with its saliency, so background tokens vanish from the trace.
"""

import dataclasses

import torch

from tokenbench.reduce import Knob, Method, Need, TokenReducedViT, register_method

from .tome import BipartiteMergeReducer

BLOCKS = (0, 1, 2)


def saliency(weights: torch.Tensor) -> torch.Tensor:
    """[B, N]: vid-TLDR's objective score of each token from its [B, H, N, N] attention rows."""
    rows = weights.mean(dim=1)
    score = (rows * rows.log()).sum(dim=2)
    score = score - score.amin(dim=1, keepdim=True)
    score = score / score.amax(dim=1, keepdim=True)
    background = score < score.mean(dim=1, keepdim=True)
    score = score - score.mean(dim=1, keepdim=True)
    score = score / score.amax(dim=1, keepdim=True)
    return score.masked_fill(background, 0.0)


class SalientMergeReducer(BipartiteMergeReducer):
    """ToMe's matching on the output tokens, (cos + 1) / 2, unmerged A tokens always in their order; each
    merged token weighted by its saliency."""

    needs = Need.PLAIN_WEIGHTS
    sort_unmerged = True

    def merge_count(self, n):
        return int(n * self.r) if self.r < 1 else int(self.r)

    def metric(self, x, info):
        return x

    def similarity(self, a, b):
        return (a @ b.transpose(1, 2) + 1) / 2

    def decide(self, x, state, info):
        match = super().decide(x, state, info)
        if match is None:
            return None
        importance = saliency(info.plain_weights)  # [B, N]: full rows, normalised over every token
        sources = match.merged
        size = torch.ones_like(x[..., 0]) if state.size is None else state.size[..., 0]
        weight = size.scatter(1, sources, size.gather(1, sources) * importance.gather(1, sources))
        return dataclasses.replace(match, weight=weight, passed_size=weight)


@register_method
class VidTLDR(Method):
    name = "vidtldr"
    family = "merge"
    knobs = (Knob("r", (0.05, 0.1, 0.15, 0.2, 0.3), noop=0.0, kind=float, low=0.0, low_inclusive=True,
                  help="tokens merged in each of blocks 0-2: a fraction of the tokens below 1, else a count"),)
    summary = "saliency-weighted ToMe merging in blocks 0-2; background tokens (flat attention) are dropped"

    def build(self, model, r=0.0):
        return TokenReducedViT(model, {i: SalientMergeReducer(r) for i in BLOCKS if r > 0 and i < len(model.blocks)})
