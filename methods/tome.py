"""ToMe: merge r similar tokens in every block by bipartite soft matching, no training needed.

After attention (and its residual) in each block, tokens are split alternately into sets A and B; each
A token finds its most similar B token (cosine similarity of this block's keys averaged over heads),
and the r best-matched A tokens are merged into their B partners. A merged token is the size-weighted
average of what it absorbed and its size is the sum, so it keeps standing for all its patches; later
blocks give it proportionally more attention by adding log(size) to its attention logits. Prefix
tokens (class, distillation, registers) are never merged and stay first; r is capped at half of the
other tokens. r is constant per block, or with `inflect` a linear ramp (inflect = -1: ToMe's
"decreasing" schedule, 2r down to 0). DeiT-S at r = 13 runs 197, 184, ..., 54 tokens.
Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (official code: facebookresearch/ToMe).
"""

import torch

from tokenbench.reduce import Knob, Merge, Method, Need, TokenReducedViT, TokenReducer, register_method


def merge_schedule(r: int, inflect: float, depth: int) -> list[int]:
    """Tokens to merge in each block: r everywhere, or a ramp from int(r(1 - inflect)) to 2r minus that."""
    first = int(r * (1 - inflect))
    last = 2 * r - first
    step = (last - first) / max(depth - 1, 1)
    return [int(first + step * i) for i in range(depth)]


class BipartiteMergeReducer(TokenReducer):
    """ToMe's bipartite matching. Variants (vid-TLDR) override what is counted, compared and scored."""

    needs = Need.KEYS
    sort_unmerged = False  # ToMe keeps the unmerged A tokens in their order only when there is a class token

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def merge_count(self, n: int) -> int:
        """Tokens to merge among the block's n tokens (before the cap at half the candidates)."""
        return self.r

    def metric(self, x, info):
        """[B, N, d] features whose cosine similarity matches tokens: the block's keys averaged over heads."""
        return info.keys.mean(dim=1)

    def similarity(self, a, b):
        return a @ b.transpose(1, 2)

    def decide(self, x, state, info):
        p, n = state.prefix, x.shape[1]
        r = min(self.merge_count(n), (n - p) // 2)
        if r <= 0:
            return None
        # A: even positions, B: odd positions (as in ToMe); prefix tokens belong to neither.
        a_start, b_start = p + p % 2, p + 1 - p % 2
        metric = self.metric(x, info)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, a_start::2], metric[:, b_start::2]
        best, partner = self.similarity(a, b).max(dim=-1)  # each A token's most similar B token
        order = best.argsort(dim=-1, descending=True)
        merged, unmerged = order[:, :r], order[:, r:]
        if p or self.sort_unmerged:
            unmerged = unmerged.sort(dim=1).values
        # Output [prefix, unmerged A, B]; each merged A token goes into its B partner.
        batch, n_b = x.shape[0], b.shape[1]
        prefix = torch.arange(p, device=x.device).expand(batch, p)
        b_tokens = b_start + 2 * torch.arange(n_b, device=x.device).expand(batch, n_b)
        return Merge(kept=torch.cat([prefix, a_start + 2 * unmerged, b_tokens], dim=1),
                     merged=a_start + 2 * merged, into=n - r - n_b + partner.gather(1, merged),
                     macs=a.shape[1] * b.shape[1] * a.shape[2])


@register_method
class ToMe(Method):
    name = "tome"
    family = "merge"
    knobs = (
        Knob("r", (4, 8, 13, 16), noop=0, kind=int, low=0, low_inclusive=True,
             help="tokens merged per block (ToMe)"),
        Knob("inflect", (0.0,), noop=0.0, kind=float, low=-1.0, high=1.0, low_inclusive=True,
             help="ToMe's r schedule: 0 constant, -1 decreasing from 2r to 0, 1 increasing"),
    )
    summary = "merge r similar tokens per block by bipartite matching, proportional attention"

    def build(self, model, r=0, inflect=0.0):
        schedule = merge_schedule(r, inflect, len(model.blocks))
        return TokenReducedViT(model, {i: BipartiteMergeReducer(n) for i, n in enumerate(schedule) if n > 0})
