"""MCTF (Multi-Criteria Token Fusion): merge tokens by similarity, informativeness and size, one step ahead.

At the start of every block but the first, the block computes its attention map on the tokens it is given
and then merges r of them before finishing attention with the merged map ("one-step-ahead attention").
Tokens are split alternately into A and B (the class token is A's first and never leaves); each A-B pair
is scored by three criteria multiplied together: similarity ((cos(x_a, x_b) + 1) / 2)^(1/tau_sim) of the
block inputs, informativeness (u_a u_b)^(1/tau_info) with u the inverse of the attention a token receives
(averaged over heads and queries, max-normalised), and size (v_a v_b)^(1/tau_size) with v the inverse
size, tau = (1, 20, 40). Bidirectional matching: the r // 2 best-scored A tokens merge into their best B,
then the r - r // 2 best-scored B tokens (carrying what they absorbed) merge into their best remaining A.
A merged token is the average weighted by attention received times relative size; the attention map's
merged keys add up and its merged queries average with the same weights; values come from the merged
tokens. Sizes add up and attention is proportional. DeiT-S at r = 16 runs 197, 181, ..., 21 tokens.
Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers",
CVPR 2024 (official code: mlvlab/MCTF, `utils/mctf.py`), in its evaluation setting (`mctf_type`
[r, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], blocks 1-11) applied to a model that was not fine-tuned with it.
Deviation: with several prefix tokens all of them are protected (the code masks the first rows of A,
which is right for the class token alone).
"""

import torch

from tokenbench.reduce import Knob, Merge, Method, Position, TokenReducedViT, TokenReducer, register_method

TAU_SIM, TAU_INFO, TAU_SIZE = 1, 20, 40  # the official evaluation's temperatures


class MultiCriteriaReducer(TokenReducer):
    position = Position.ONE_STEP_AHEAD

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def decide(self, x, state, info):
        p, (batch, n, _) = state.prefix, x.shape
        r = self.r if n - self.r >= 10 else n - 10  # the code's floor of 10 tokens
        r = min(r, (n - p) // 2)
        if r <= 0:
            return None
        first, second = r // 2, r - r // 2
        metric = x / x.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = ((a @ b.transpose(1, 2) + 1) / 2) ** (1 / TAU_SIM)
        received = info.weights.mean(dim=(1, 2))  # [B, n] attention received, averaged over heads and queries
        informative = 1 / received
        informative = informative / informative.amax(dim=1, keepdim=True)
        scores = scores * (informative[:, ::2, None] * informative[:, None, 1::2]) ** (1 / TAU_INFO)
        size = torch.ones_like(x[..., 0]) if state.size is None else state.size[..., 0]
        if state.size is not None:
            small = 1 / size
            small = small / small.amax(dim=1, keepdim=True)
            scores = scores * (small[:, ::2, None] * small[:, None, 1::2]) ** (1 / TAU_SIZE)
        scores[:, :(p + 1) // 2, :] = -torch.inf  # prefix tokens in A never leave
        scores[:, :, :p // 2] = -torch.inf  # nor do those in B (none with a class token alone)
        # A -> B: the `first` best-scored A tokens leave; the others keep their order.
        best, partner = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)
        sources, rest = ranked[:, :first], ranked[:, first:].sort(dim=1).values
        # B -> remaining A, on the same scores.
        back = scores.gather(1, rest[..., None].expand(-1, -1, scores.shape[2])).transpose(1, 2)
        best_back, partner_back = back.max(dim=-1)
        ranked_back = best_back.sort(dim=-1, descending=True).indices
        leaving, staying = ranked_back[:, :second], ranked_back[:, second:]
        # Output [remaining A, B that stayed]; a B token that left takes what it absorbed to its A partner.
        n_rest = rest.shape[1]
        b_position = torch.empty_like(best_back, dtype=torch.long)
        b_position.scatter_(1, staying, n_rest + torch.arange(staying.shape[1], device=x.device).expand(batch, -1))
        b_position.scatter_(1, leaving, partner_back.gather(1, leaving))
        weight = received * size / size.amax(dim=1, keepdim=True)
        return Merge(kept=torch.cat([2 * rest, 2 * staying + 1], dim=1),
                     merged=torch.cat([2 * sources, 2 * leaving + 1], dim=1),
                     into=torch.cat([b_position.gather(1, partner.gather(1, sources)), b_position.gather(1, leaving)],
                                    dim=1),
                     weight=weight, macs=a.shape[1] * b.shape[1] * x.shape[-1])


@register_method
class MCTF(Method):
    name = "mctf"
    family = "merge"
    knobs = (Knob("r", (4, 8, 12, 16, 20), noop=0, kind=int, low=0, low_inclusive=True,
                  help="MCTF: tokens merged at the start of every block but the first"),)
    summary = "multi-criteria (similarity, informativeness, size) bidirectional merging with one-step-ahead attention"

    def build(self, model, r=0):
        reducers = {} if r == 0 else {i: MultiCriteriaReducer(r) for i in range(1, len(model.blocks))}
        return TokenReducedViT(model, reducers)
