"""PiToMe: merge tokens in every block, but protect the informative ones, found by an energy score.

After attention in every block, each patch token gets an energy: the mean over all patch tokens of
ELU(cos(k_i, k_j) - margin), with k the block's keys averaged over heads and a margin that falls with
depth (0.75 - 0.75 l / L). A token in a dense cluster of similar tokens has high energy; an isolated,
informative one has low energy. With r = floor(T - T ratio) of the T patch tokens to remove:
- in the first ceil(L / 2) blocks, the tokens sorted by energy (descending) are split alternately into A
  and B, and ToMe's matching merges the r best-matched A tokens into their most similar B tokens;
- in the later blocks only the 2r highest-energy tokens may merge: alternately A and B among them, every
  A merges into its most similar B; the other T - 2r tokens are protected.
Merges are size-weighted means and sizes add up, but attention is not proportional (the official
default). Output order: [class token, unmerged A or protected tokens, B tokens], as in the official code.
DeiT-S at ratio 0.9 runs 197, 178, 161, 145, ... tokens, 60 after the last block.
Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024 (official
code: hchautran/PiToMe, `algo/pitome`). Deviation: every prefix token (class, distillation, registers) is
protected, where the official code strips only the class token.
"""

import math

import torch
import torch.nn.functional as F

from tokenbench.reduce import Knob, Merge, Method, Need, TokenReducedViT, TokenReducer, register_method


class EnergyMergeReducer(TokenReducer):
    needs = Need.KEYS

    def __init__(self, ratio: float, margin: float, matching: bool):
        super().__init__()
        self.ratio, self.margin, self.matching = ratio, margin, matching

    def decide(self, x, state, info):
        p = state.prefix
        metric = F.normalize(info.keys.mean(dim=1)[:, p:], p=2, dim=-1)
        T = metric.shape[1]
        r = math.floor(T - T * self.ratio)
        if r <= 0:
            return None
        sim = metric @ metric.transpose(-1, -2)
        energy = F.elu(sim - self.margin, alpha=1.0).mean(dim=-1)
        order = energy.argsort(dim=-1, descending=True)
        if self.matching:  # ToMe's matching between alternate halves of the energy order
            a, b = order[:, ::2], order[:, 1::2]
            scores = sim.gather(2, b[:, None, :].expand(-1, T, -1)).gather(1, a[..., None].expand(-1, -1, b.shape[1]))
            best, partner = scores.max(dim=-1)
            ranked = best.argsort(dim=-1, descending=True)
            sources, rest = a.gather(1, ranked[:, :r]), a.gather(1, ranked[:, r:])
            into = partner.gather(1, ranked[:, :r])
        else:  # the 2r highest-energy tokens merge pairwise; the others are protected
            a, b, rest = order[:, :2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
            scores = sim.gather(2, b[:, None, :].expand(-1, T, -1)).gather(1, a[..., None].expand(-1, -1, r))
            sources, into = a, scores.max(dim=-1).indices
        batch = x.shape[0]
        prefix = torch.arange(p, device=x.device).expand(batch, p)
        return Merge(kept=torch.cat([prefix, p + rest, p + b], dim=1), merged=p + sources,
                     into=p + rest.shape[1] + into, macs=T * T * metric.shape[-1])


@register_method
class PiToMe(Method):
    name = "pitome"
    family = "merge"
    knobs = (Knob("ratio", (0.975, 0.95, 0.925, 0.9, 0.875, 0.85), noop=1.0, low=0.5, high=1.0,
                  low_inclusive=True, help="PiToMe: fraction of patch tokens kept by every block"),)
    summary = "energy-protected merging: isolated (informative) tokens are kept, redundant ones merged"

    def build(self, model, ratio=1.0):
        depth = len(model.blocks)
        matching_blocks = math.ceil(depth * 0.5)
        reducers = {} if ratio >= 1.0 else {
            i: EnergyMergeReducer(ratio, 0.75 - 0.75 * (i / depth), matching=i < matching_blocks)
            for i in range(depth)}
        return TokenReducedViT(model, reducers, proportional_attention=False)
