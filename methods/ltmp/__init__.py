"""LTMP: a learned merge threshold and prune threshold in every block decide which tokens go.

After attention (and its residual) in each block, the tokens split alternately into sets A and B as in
ToMe (cosine similarity of the block's keys averaged over heads). Every A token whose most similar B token
is more similar than the block's merge threshold merges into it (size-weighted; proportional attention
after). Then every token whose importance, the attention it received averaged over heads and queries (a
merged token takes the largest of its parts'), is not above the block's prune threshold is dropped. Images
keep different numbers of tokens. The thresholds are learned with the backbone frozen for a target FLOPs
ratio (the knob): training removes nothing; straight-through sigmoid masks (temperature tau) gate each
key's attention, merged tokens are added into their partners and stay in place, masked, and the loss is
cross-entropy plus 10 x (the FLOPs ratio the masks imply - the target)^2.
Bonnaerens & Dambre, "Learned Thresholds Token Merging and Pruning for Vision Transformers", TMLR 2023
(official code: Mxbonn/ltmp at 1a9c055: `ltmp/timm/lt_mergeprune.py` (training),
`lt_mergeprune_inference.py` (inference), `threshold_masking.py`, `tools/train.py`).

Deviations from the official code:
- Batches: the official inference runs one image at a time (images keep different numbers of tokens);
  here a batch runs together, padded and masked, with the same decisions per image.
- Prefix tokens: all are protected and A/B alternate over the patch tokens after them, as in `tome`
  (official: only token 0 is protected; for one class token the split is the same).
- Schedule: plain SGD as the official, but a few hundred steps (one CIFAR-10 epoch; 30 on digits) where
  the official trains one ImageNet epoch (about 10,000 steps) at 5e-3 (merge) and 5e-6 (prune); so the
  prune thresholds learn at the merge rate / N (N the model's tokens: importance scores are of order
  1/N), which moves them as far relative to the scores in these fewer steps. (AdamW's normalised steps
  pushed the merge thresholds past every similarity, where no token merges and their gradient is 0.)
  The engine's cosine schedule decays the rate within the run (the official's holds it for its one epoch).
- Each target of the sweep has its own thresholds in one module (`ltmp_thresholds`), trained one target
  per `tokenbench train --method ltmp --target T` run; a target never trained is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.reduce import (
    BenchError,
    Gate,
    Knob,
    Merge,
    Method,
    Need,
    TokenReducedViT,
    TokenReducer,
    mean_attention_received,
    register_method,
)

TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5)  # FLOPs ratios with thresholds of their own
MERGE_INIT, PRUNE_INIT = 0.9, 0.0  # the official training's initial thresholds
TAU = 0.5  # tools/train.py's default temperature
REG_WEIGHT = 10.0  # tools/train.py's --reg-scale


class Thresholds(nn.Module):
    """Per target of `TARGETS`: a merge and a prune threshold for every block; `trained` marks the targets
    whose thresholds were trained."""

    def __init__(self, depth: int):
        super().__init__()
        self.merge = nn.ParameterList(nn.Parameter(torch.full((depth,), MERGE_INIT)) for _ in TARGETS)
        self.prune = nn.ParameterList(nn.Parameter(torch.full((depth,), PRUNE_INIT)) for _ in TARGETS)
        self.register_buffer("trained", torch.zeros(len(TARGETS), dtype=torch.bool))

    def row(self, target: float) -> int:
        for i, t in enumerate(TARGETS):
            if math.isclose(t, target):
                return i
        raise BenchError(f"ltmp has thresholds for the targets {', '.join(map(str, TARGETS))}, not {target}")


def straight_through(values: torch.Tensor, threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """1 where values > threshold, else 0, with the gradient of sigmoid((values - threshold) / tau)."""
    soft = torch.sigmoid((values - threshold) / tau)
    return soft + ((soft > 0.5).to(soft.dtype) - soft).detach()


class LTMPReducer(TokenReducer):
    """One block's thresholds: hard merging and pruning (eval), masks that gate attention (training)."""

    needs = Need.KEYS | Need.WEIGHTS

    def __init__(self, merge: nn.Parameter, prune: nn.Parameter, block: int, masks: list):
        super().__init__()
        self.merge, self.prune, self.block = merge, prune, block
        self.masks = masks  # training: each block's [B, N] gate, for the FLOPs term of the loss

    def decide(self, x, state, info):
        p, n = state.prefix, x.shape[1]
        a_idx = torch.arange(p + p % 2, n, 2, device=x.device)  # A: even positions, B: odd (as in ToMe)
        b_idx = torch.arange(p + 1 - p % 2, n, 2, device=x.device)
        if len(b_idx) == 0:  # one patch token left: nothing to merge or prune against
            return None
        metric = info.keys.mean(dim=1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        if self.training:
            return self.decide_training(x, state, info, metric, a_idx, b_idx)
        return self.decide_hard(x, state, info, metric, a_idx, b_idx)

    def decide_hard(self, x, state, info, metric, a_idx, b_idx):
        """The inference rule: merge A tokens above the merge threshold, then drop what is not above the
        prune threshold. Output: prefix, unmerged A, B, each in order, padding last."""
        (B, n), p = x.shape[:2], state.prefix
        real = torch.ones(B, n, dtype=torch.bool, device=x.device) if state.mask is None else state.mask
        scores = metric[:, a_idx] @ metric[:, b_idx].transpose(1, 2)
        scores = scores.masked_fill(~real[:, None, b_idx], -math.inf)  # padding is nobody's partner
        best, partner = scores.max(dim=-1)
        merging = (best > self.merge[self.block]) & real[:, a_idx]
        importance = mean_attention_received(info.weights, state.mask).mean(dim=1)
        importance[:, :p] = math.inf
        from_a = torch.where(merging, importance[:, a_idx], -math.inf)
        importance[:, b_idx] = importance[:, b_idx].scatter_reduce(1, partner, from_a, "amax")
        keep = real & (importance > self.prune[self.block])
        keep[:, a_idx] &= ~merging
        position = torch.arange(n, device=x.device).expand(B, n)
        rank = position + n * torch.isin(position, b_idx) + 2 * n * ~keep  # prefix, A, B, then the rest
        order = rank.argsort(dim=1)
        counts = keep.sum(dim=1)
        k, k_min = int(counts.max()), int(counts.min())
        slot = torch.empty_like(order).scatter_(1, order, position)  # each token's output position
        partner_token = torch.full_like(position, -1)
        partner_token[:, a_idx] = torch.where(merging, b_idx[partner], -1)
        merged = order[:, k_min:]
        target = partner_token.gather(1, merged)
        passes = (target >= 0) & keep.gather(1, target.clamp(min=0))
        into = torch.where(passes, slot.gather(1, target.clamp(min=0)), 0)
        valid = position[:, :k] < counts[:, None]
        n_real = real.sum(dim=1)  # real tokens come first: A and B positions below n_real
        pairs = ((n_real - p - p % 2 + 1) // 2).clamp(min=0) * ((n_real - p - 1 + p % 2 + 1) // 2).clamp(min=0)
        return Merge(kept=order[:, :k], merged=merged, into=into, dropped=~passes,
                     valid=None if state.mask is None and k == k_min else valid,
                     macs=pairs.to(x.dtype) * metric.shape[-1])

    def decide_training(self, x, state, info, metric, a_idx, b_idx):
        """The official training block: nothing is removed. Merged A tokens add into their partners and
        are masked; the prune mask then gates the tokens still unmasked. Output order: prefix, A, B."""
        (B, n), p = x.shape[:2], state.prefix
        gate = x.new_ones(B, n) if state.key_gate is None else state.key_gate
        metric = metric * gate.detach()[..., None]
        best, partner = (metric[:, a_idx] @ metric[:, b_idx].transpose(1, 2)).max(dim=-1)
        merging = straight_through(best, self.merge[self.block], TAU)
        a_gate = gate[:, a_idx]
        unmerged = torch.where(a_gate.bool(), 1 - merging, a_gate)
        importance = info.weights.mean(dim=(1, 2))  # over heads and every query, masked ones too (official)
        importance[:, :p] = math.inf
        from_a = importance[:, a_idx] * merging.detach()
        b_importance = importance[:, b_idx].scatter_reduce(1, partner, from_a, "amax")
        prefix = torch.arange(p, device=x.device)
        order = torch.cat([prefix, a_idx, b_idx])
        gate = torch.cat([gate[:, :p], unmerged, gate[:, b_idx]], dim=1)
        importance = torch.cat([importance[:, :p], importance[:, a_idx], b_importance], dim=1)
        gate = torch.where(gate.bool(), straight_through(importance, self.prune[self.block], TAU), gate)
        self.masks.append(gate)
        kept = order.expand(B, n)
        into = p + len(a_idx) + partner
        return [Merge(kept=kept, merged=a_idx.expand(B, -1), into=into, dropped=merging.detach() < 0.5),
                Gate(gate=gate, in_attention=True)]


def flops_ratio(masks: list, tokens: int, dim: int) -> torch.Tensor:
    """The official training's FLOPs ratio of the blocks from the mean of each block's mask (tools/train.py)."""
    kept = [1.0] + [m.mean() for m in masks]
    n, d, depth = tokens, dim, len(masks)
    dense = 6 * n * d**2 + n**2 * d
    return sum((2 * kept[i] * n * d**2 + (kept[i] * n) ** 2 * d + 4 * kept[i + 1] * n * d**2) / dense
               for i in range(depth)) / depth


def thresholds_of(model) -> Thresholds:
    thresholds = getattr(model, "ltmp_thresholds", None)
    if thresholds is None:
        raise BenchError("ltmp needs a backbone whose thresholds were trained "
                         "(tokenbench train --method ltmp --init BACKBONE --target T ...)")
    return thresholds


@register_method
class LTMP(Method):
    name = "ltmp"
    family = "merge"  # and prunes, as PPT and DiffRate
    needs_training = True
    training_optimizer = "sgd"
    knobs = (Knob("target", TARGETS, noop=1.0, low=0.0, high=1.0, sweep_only=True,
                  help="LTMP: the FLOPs ratio its thresholds were trained for (1: no reduction)"),)
    summary = "learned per-block thresholds merge similar and prune unimportant tokens (per image)"

    def attach(self, model):
        if getattr(model, "ltmp_thresholds", None) is None:
            model.ltmp_thresholds = Thresholds(len(model.blocks))
        return model

    def build(self, model, target=1.0, masks=None):
        if math.isclose(target, 1.0):
            return TokenReducedViT(model, {})
        thresholds = thresholds_of(model)
        row = thresholds.row(target)
        if not thresholds.trained[row]:
            raise BenchError(f"this model's ltmp thresholds for target {target} were never trained "
                             f"(tokenbench train --method ltmp --target {target} --init CHECKPOINT ...)")
        masks = [] if masks is None else masks
        merge, prune = thresholds.merge[row], thresholds.prune[row]
        reducers = {b: LTMPReducer(merge, prune, b, masks) for b in range(len(model.blocks))}
        return TokenReducedViT(model, reducers).train(model.training)

    def with_fresh_parts(self, model):
        """A copy with stand-ins for trained thresholds at every target, so that the compute runs without
        them: merge above a similarity of the target itself (0.9 … 0.5: lower targets merge more, even on a
        random-init model), prune at the official initial 0 (nothing)."""
        model = super().with_fresh_parts(model)
        thresholds = model.ltmp_thresholds
        with torch.no_grad():
            for row, target in enumerate(TARGETS):
                thresholds.merge[row].fill_(target)
        thresholds.trained.fill_(True)
        return model

    def training_loss(self, model, target=0.7):
        """This target's thresholds only (the backbone and other targets frozen): CE + 10 x (ratio - target)^2."""
        thresholds = self.attach(model).ltmp_thresholds
        row = thresholds.row(target)
        for p in model.parameters():
            p.requires_grad_(False)
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        for p in (thresholds.merge[row], thresholds.prune[row]):
            p.requires_grad_(True)
        thresholds.prune[row].lr_scale = 1.0 / tokens
        thresholds.trained[row] = True
        masks: list = []
        trainee = self.build(model, target, masks)

        def loss(m, images, labels, label_smoothing=0.0):
            masks.clear()
            logits = m(images)
            ratio = flops_ratio(masks, tokens, model.embed_dim)
            return F.cross_entropy(logits, labels, label_smoothing=label_smoothing) + REG_WEIGHT * (ratio - target) ** 2
        return trainee, loss
