"""EViT: keep the patch tokens the class token attends to most and fuse the rest into one token.

After attention (and its residual) in blocks 3, 6, 9 of a 12-block model, rank the N - 1 current patch
tokens by the class token's attention averaged over heads and keep the top ceil(k * (N - 1)); the
dropped tokens become one fused token, their sum weighted by that same attention (not renormalised),
appended last. An earlier stage's fused token is an ordinary candidate at the next stage, so DeiT-S
at k = 0.7 runs 197 -> 140 -> 100 -> 72 tokens. The paper's argument: the class token's attention says
which patches matter for the prediction, and fusing keeps a trace of the inattentive ones.
Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022 (official code: youweiliang/evit).
On a model without a class token (VideoMAE, average-pool ViTs) every token is a candidate and the attention
each token receives, averaged over all queries, stands in for the class token's attention
(`tokenbench.tokens.run_attention`: it needs the full attention map; results rows record the substitute).
"""

from tokenbench.reduce import (
    Method,
    Need,
    Prune,
    TokenReducedViT,
    TokenReducer,
    keep_count,
    keep_rate_knob,
    reduction_stages,
    register_method,
)


class FuseInattentiveReducer(TokenReducer):
    needs = Need.CLS_ATTN

    def __init__(self, keep_rate: float):
        super().__init__()
        self.keep_rate = keep_rate

    def decide(self, x, state, info):
        n = x.shape[1] - state.prefix
        k = keep_count(self.keep_rate, n)
        if k == n:
            return None
        score = info.cls_attn[:, :, state.prefix:].mean(dim=1)  # [B, n]
        weight, order = score.sort(dim=1, descending=True)
        # Keep the top k; the rest become one token, their sum weighted by the same attention.
        return Prune(keep=order[:, :k], fuse_index=order[:, k:], fuse_weight=weight[:, k:])


@register_method
class EViT(Method):
    name = "evit"
    family = "prune"
    knobs = (keep_rate_knob(),)
    summary = "keep the most class-attended tokens at blocks 3/6/9, fuse the rest into one token"

    def build(self, model, keep=1.0):
        blocks = reduction_stages(model, keep)
        return TokenReducedViT(model, {i: FuseInattentiveReducer(keep) for i in blocks})
