"""DynamicViT: a learned prediction module drops uninformative tokens before blocks 3, 6 and 9.

Each prediction module scores every patch token from its own features and a global feature (the mean
over the tokens still kept); before block s (of the 3 stages) the image keeps its int(N * rho^s)
best-scored patches, relative to the original N, and the block runs on the shorter sequence. Training
never drops tokens: Gumbel-softmax decisions mask the dropped tokens out of attention (as keys) and a
straight-through gate passes gradients to the predictor; the loss is cross-entropy plus 2 x the MSE
between each image's kept fraction and rho^s plus 0.5 x KL to the dense model's prediction.
Here the backbone is frozen while the predictors train (the paper fine-tunes it at 1/100 of their
learning rate), so the dense model is its own teacher and rho = 1 reproduces the backbone exactly.
The knob is the paper's base keep rate rho, not a per-stage fraction: stage s keeps rho^s of the original
patches.
Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification", NeurIPS 2021
(official code: raoyongming/DynamicViT).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.reduce import (
    BenchError,
    Gate,
    Knob,
    Method,
    Position,
    Prune,
    TokenReducedViT,
    TokenReducer,
    default_reduction_blocks,
    linear_macs_per_token,
    norm_macs_per_token,
    register_method,
)

RATIO_WEIGHT, DISTILL_WEIGHT = 2.0, 0.5  # the paper's loss weights for DeiT


class Predictor(nn.Module):
    """Log-probabilities [B, N, 2] (column 0: keep) from local features and the mean of the kept ones."""

    def __init__(self, dim: int):
        super().__init__()
        self.local = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                   nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        z = self.local(x)
        half = z.shape[-1] // 2
        kept = policy[..., None]
        glob = (z[..., half:] * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True)
        return self.score(torch.cat([z[..., :half], glob.expand(-1, z.shape[1], -1)], dim=-1))

    def macs_per_token(self) -> tuple[int, int]:
        norm = norm_macs_per_token(self)
        return linear_macs_per_token(self) + norm, norm


class PredictorReducer(TokenReducer):
    """Before block s: keep int(N * rho^s) patches by predicted score (eval), or gate by Gumbel decisions (train)."""

    position = Position.BEFORE_BLOCK

    def __init__(self, predictor: Predictor, stage: int, rho: float, patches: int, decisions: list):
        super().__init__()
        self.predictor, self.stage, self.rho, self.patches = predictor, stage, rho, patches
        self.decisions = decisions  # training: the [B, N] keep decisions of each stage, for the ratio loss

    def decide(self, x, state, info):
        p = state.prefix
        if self.training:
            policy = x.new_ones(x.shape[:2]) if state.mask is None else state.mask.to(x.dtype)
            scores = self.predictor(x[:, p:], policy[:, p:])
            keep = F.gumbel_softmax(scores, hard=True)[..., 0] * policy[:, p:]  # straight-through gate
            self.decisions.append(keep)
            return Gate(gate=torch.cat([policy[:, :p], keep], dim=1))
        n = x.shape[1] - p
        scores = self.predictor(x[:, p:], x.new_ones(x.shape[0], n))
        macs, norm = self.predictor.macs_per_token()
        k = min(n, int(self.patches * self.rho ** self.stage))
        return Prune(keep=scores[..., 0].argsort(dim=1, descending=True)[:, :k], macs=macs * n, norm_macs=norm * n)


def predictors_of(model) -> nn.ModuleList:
    predictors = getattr(model, "token_predictors", None)
    if predictors is None:
        raise BenchError("dynamicvit needs a backbone trained with its predictors "
                         "(tokenbench train --method dynamicvit --init BACKBONE ...)")
    return predictors


@register_method
class DynamicViT(Method):
    name = "dynamicvit"
    family = "prune"
    needs_training = True
    knobs = (Knob("rho", (0.9, 0.8, 0.7, 0.6, 0.5), noop=1.0, low=0.0, high=1.0,
                  help="DynamicViT: base keep rate; stage s keeps int(N * rho^s) of the N patches"),)
    summary = "learned predictors drop tokens before blocks 3/6/9 (keeps N*rho^s)"

    def attach(self, model):
        if getattr(model, "token_predictors", None) is None:
            model.token_predictors = nn.ModuleList(
                Predictor(model.embed_dim) for _ in default_reduction_blocks(len(model.blocks)))
        return model

    def build(self, model, rho=1.0, decisions=None):
        predictors = predictors_of(model)
        blocks = default_reduction_blocks(len(model.blocks)) if rho < 1 else ()
        patches = model.patch_embed.num_patches
        decisions = [] if decisions is None else decisions
        reducers = {b: PredictorReducer(predictors[s], s + 1, rho, patches, decisions) for s, b in enumerate(blocks)}
        return TokenReducedViT(model, reducers).train(model.training)  # a fresh module would train (Gumbel)

    def training_loss(self, model, rho=0.7):
        """Predictors only (the backbone is frozen): CE + ratio MSE + KL to the dense model."""
        self.attach(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.token_predictors.parameters():
            p.requires_grad_(True)
        decisions: list = []
        trainee = self.build(model, rho, decisions)

        def loss(m, images, labels, label_smoothing=0.0):
            decisions.clear()
            logits = m(images)
            with torch.no_grad():
                teacher = m.vit(images).log_softmax(-1)
            ratio = torch.stack([(d.mean(1) - rho ** (s + 1)).pow(2).mean() for s, d in enumerate(decisions)]).mean()
            distill = F.kl_div(logits.log_softmax(-1), teacher, reduction="batchmean", log_target=True)
            ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            return ce + RATIO_WEIGHT * ratio + DISTILL_WEIGHT * distill
        return trainee, loss
