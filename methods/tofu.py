"""ToFu (Token Fusion): ToMe's matching, pruning in the early blocks and norm-preserving merging in the late ones.

Every block matches tokens exactly as ToMe does (alternate split into A and B, cosine similarity of the
block's keys averaged over heads, the r best-matched A tokens leave). In the first half of the network
(block index <= depth // 2) the matched A tokens are simply dropped, since early features are still
similar enough that averaging buys nothing; in the later blocks each B token becomes the MLERP of what it
absorbed: the plain mean of the group, rescaled by the largest norm in the group over the B token's own
norm. No sizes are kept and attention is not proportional. r is constant per block, or with `inflect` a
linear ramp as ToMe's. ViT-S at r = 13 runs 197, 184, ..., 54 tokens (2.7 GMACs).
Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token Merging", WACV 2024. No
official code was released; this follows the re-implementations the field compares against
(Westlake-AI/OpenToMe `tofu.py`, the same as hchautran/PiToMe `algo/tofu`), including where they differ
from the paper: pruning runs up to block depth // 2 inclusive (blocks 0-6 of 12, where the paper's best
switch is after block 5), MLERP divides by the B token's norm before merging rather than by the norm of
the mean, and the group mean is unweighted.
"""


from tokenbench.reduce import Knob, Merge, Method, Prune, TokenReducedViT, register_method

from .tome import BipartiteMergeReducer, merge_schedule


class FusionReducer(BipartiteMergeReducer):
    """ToMe's matching; the matched A tokens are dropped (`prune`) or fused by MLERP into their partners."""

    def __init__(self, r: int, prune: bool):
        super().__init__(r)
        self.prune = prune

    def decide(self, x, state, info):
        match = super().decide(x, state, info)
        if match is None:
            return None
        if self.prune:  # keep [prefix, unmatched A, B] in ToMe's output order, drop the matched A tokens
            return Prune(keep=match.kept[:, state.prefix:] - state.prefix, macs=match.macs)
        n, norms = x.shape[1], x.shape[1] * x.shape[-1]  # MLERP takes every token's norm
        return Merge(kept=match.kept, merged=match.merged, into=match.into, weight=x.new_ones(x.shape[0], n),
                     mlerp=True, macs=match.macs + norms, norm_macs=norms)


@register_method
class ToFu(Method):
    name = "tofu"
    family = "merge"
    knobs = (
        Knob("r", (4, 8, 13, 16, 20), noop=0, kind=int, low=0, low_inclusive=True,
             help="tokens pruned or fused per block (ToFu)"),
        Knob("inflect", (0.0,), noop=0.0, kind=float, low=-1.0, high=1.0, low_inclusive=True,
             help="ToFu's r schedule, as ToMe's: 0 constant, -1 decreasing from 2r to 0, 1 increasing"),
    )
    summary = "ToMe's matching; prune in early blocks, norm-preserving (MLERP) merge in late ones"

    def build(self, model, r=0, inflect=0.0):
        depth = len(model.blocks)
        schedule = merge_schedule(r, inflect, depth)
        reducers = {i: FusionReducer(n, prune=i <= depth // 2) for i, n in enumerate(schedule) if n > 0}
        return TokenReducedViT(model, reducers, proportional_attention=False)
