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
(`bench.tokens.run_attention`: it needs the full attention map; results rows record the substitute).
"""

import torch

from bench.ledger import active_ledger
from bench.registry import Method, keep_rate_knob, register_method
from bench.tokens import TokenReducedViT, TokenReducer, default_reduction_blocks, gather_tokens, keep_count, keep_tokens


class FuseInattentiveReducer(TokenReducer):
    needs = frozenset({"cls_attn"})

    def __init__(self, keep_rate: float):
        super().__init__()
        self.keep_rate = keep_rate

    def forward(self, x, state, info):
        p = state.prefix
        n = x.shape[1] - p
        k = keep_count(self.keep_rate, n)
        if k == n:
            return x
        score = info.cls_attn[:, :, p:].mean(dim=1)  # [B, n]
        weight, order = score.sort(dim=1, descending=True)
        dropped = order[:, k:] + p
        # The fused token: attention-weighted sum of the dropped post-residual tokens, as one matmul.
        fused = weight[:, None, k:] @ gather_tokens(x, dropped)  # [B, 1, C]
        ledger = active_ledger()
        if ledger is not None:
            ledger.add((n - k) * x.shape[-1])
        fused_source = None
        if state.source is not None:
            fused_source = gather_tokens(state.source, dropped).sum(1, keepdim=True)
        x = torch.cat([keep_tokens(x, state, order[:, :k]), fused], dim=1)
        if fused_source is not None:
            state.source = state.stages[-1] = torch.cat([state.source, fused_source], dim=1)
        return x


@register_method
class EViT(Method):
    name = "evit"
    family = "prune"
    knobs = (keep_rate_knob(),)
    summary = "keep the most class-attended tokens at blocks 3/6/9, fuse the rest into one token"

    def build(self, model, keep=1.0):
        blocks = default_reduction_blocks(len(model.blocks)) if keep < 1 else ()
        return TokenReducedViT(model, {i: FuseInattentiveReducer(keep) for i in blocks})
