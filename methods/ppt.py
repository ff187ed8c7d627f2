"""PPT (Token Pruning and Pooling): per image, prune the inattentive tokens or pool the similar ones.

After attention in blocks 3, 6 and 9, each image's tokens get ATS's significance score: the class token's
attention (summed over heads) times the norm of the token's value vector, normalised to sum to one over
the patch tokens. The variance of these scores decides, image by image: a flat distribution (variance
below the threshold, 7e-5) means no token stands out, so the image pools r tokens by ToMe's bipartite
matching (size-weighted averages); otherwise it prunes the r least significant tokens, keeping the others
in descending significance with the class token first. Both remove the same r = min(r, (N - 1) // 2), so
the batch stays rectangular; attention is proportional to the sizes in every block. DeiT-S at r = 50 runs
197, 147, 97, 49 tokens (2.944 GMACs by the README's torchprofile count).
Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers", arXiv 2310.01812 (official
code: xjwu1024/PPT, `ppt_deit.py`), its off-the-shelf setting. Deviations: every prefix token is protected
(the code hard-codes one class token); on a model without a class token the mean attention each token
receives stands in for the class token's (as for top-k and EViT).
"""

import torch

from tokenbench.reduce import Knob, Merge, Method, Need, TokenReducedViT, default_reduction_blocks, register_method

from .tome import BipartiteMergeReducer


class PruneOrPoolReducer(BipartiteMergeReducer):
    needs = Need.CLS_ATTN | Need.KEYS | Need.VALUES

    def __init__(self, r: int, threshold: float):
        super().__init__(r)
        self.threshold = threshold

    def decide(self, x, state, info):
        p, n = state.prefix, x.shape[1]
        pool = super().decide(x, state, info)  # ToMe's matching for the images that pool
        if pool is None:
            return None
        r = pool.merged.shape[1]
        value_norm = info.values.transpose(1, 2).flatten(2).norm(dim=-1)  # [B, N]: all heads' values
        significance = info.cls_attn.sum(dim=1) * value_norm
        patches = significance[:, p:] / significance[:, p:].sum(dim=1, keepdim=True)
        flat = patches.var(dim=1) < self.threshold  # [B]: no token stands out -> pool
        scores = torch.cat([patches.new_full((x.shape[0], p), 2.0), patches], dim=1)
        ranked = scores.argsort(dim=1, descending=True)
        kept, dropped = ranked[:, :n - r], ranked[:, n - r:]
        choose = flat[:, None]
        return Merge(kept=torch.where(choose, pool.kept, kept), merged=torch.where(choose, pool.merged, dropped),
                     into=torch.where(choose, pool.into, torch.zeros_like(pool.into)),
                     dropped=~choose.expand(-1, r), macs=pool.macs)


@register_method
class PPT(Method):
    name = "ppt"
    family = "merge"
    knobs = (Knob("r", (20, 30, 40, 50, 70, 98), noop=0, kind=int, low=0, low_inclusive=True,
                  help="PPT: tokens pruned or pooled in each of blocks 3, 6, 9"),
             Knob("threshold", (7e-5,), noop=7e-5, low=0.0, low_inclusive=True,
                  help="PPT: an image whose significance variance is below this pools, above it prunes"))
    summary = "per image: prune inattentive tokens (significance) or pool similar ones (ToMe), by score variance"

    def build(self, model, r=0, threshold=7e-5):
        blocks = default_reduction_blocks(len(model.blocks))
        reducers = {} if r == 0 else {b: PruneOrPoolReducer(r, threshold) for b in blocks}
        return TokenReducedViT(model, reducers)
