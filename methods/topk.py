"""Top-k: keep the patch tokens the class token attends to most (EViT without fusion).

After attention (and its residual) in blocks 3, 6, 9 of a 12-block model, keep ceil(k * (N - 1)) patch
tokens ranked by the class token's attention averaged over heads; the class token is always kept.
Liang et al., "Not All Patches are What You Need" (EViT), ICLR 2022, rows without fusion.
"""

from tokenbench.reduce import (
    KeepRateReducer,
    Method,
    Need,
    TokenReducedViT,
    keep_rate_knob,
    reduction_stages,
    register_method,
)


class ClassAttentionReducer(KeepRateReducer):
    needs = Need.CLS_ATTN

    def score(self, x, state, info):
        return info.cls_attn[:, :, state.prefix:].mean(dim=1)


@register_method
class TopK(Method):
    name = "topk"
    family = "prune"
    knobs = (keep_rate_knob(),)
    summary = "keep the most class-attended tokens at blocks 3/6/9"

    def build(self, model, keep=1.0):
        blocks = reduction_stages(model, keep)
        return TokenReducedViT(model, {i: ClassAttentionReducer(keep) for i in blocks})
