"""Top-k: keep the patch tokens the class token attends to most (EViT without fusion).

After attention (and its residual) in blocks 3, 6, 9 of a 12-block model, keep ceil(k * (N - 1)) patch
tokens ranked by the class token's attention averaged over heads; the class token is always kept.
Liang et al., "Not All Patches are What You Need" (EViT), ICLR 2022, rows without fusion.
"""

from bench.registry import Method, keep_rate_knob, register_method
from bench.tokens import TokenReducedViT, TokenReducer, default_reduction_blocks, keep_count, keep_tokens


class TopKReducer(TokenReducer):
    needs = frozenset({"cls_attn"})

    def __init__(self, keep_rate: float):
        super().__init__()
        self.keep_rate = keep_rate

    def forward(self, x, state, info):
        n = x.shape[1] - state.prefix
        k = keep_count(self.keep_rate, n)
        if k == n:
            return x
        score = info.cls_attn[:, :, state.prefix:].mean(dim=1)
        return keep_tokens(x, state, score.topk(k, dim=1).indices)


@register_method
class TopK(Method):
    name = "topk"
    family = "prune"
    knobs = (keep_rate_knob(),)
    summary = "keep the most class-attended tokens at blocks 3/6/9"

    def build(self, model, keep=1.0):
        blocks = default_reduction_blocks(len(model.blocks)) if keep < 1 else ()
        return TokenReducedViT(model, {i: TopKReducer(keep) for i in blocks})
