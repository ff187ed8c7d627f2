"""DVT's cascade: ViTs of one width on growing token grids, each reusing the previous stage's work.

Each stage is a timm ViT of the same width with its own weights and classifier, on a finer token grid
than the last (DeiT-S at 224: 7x7, 10x10, 14x14 tokens; the 10x10 grid needs a padded k=23 stride-23
patch conv). Downstream stages reuse the previous stage's work: *feature reuse* turns its final patch
tokens (before the final norm) into a narrow context embedding, one LayerNorm-MLP per downstream block,
upsampled to the new grid and concatenated into that block's MLP input (the class token gets zeros);
*relationship reuse* mixes the pre-softmax attention logits of all upstream layers with 1x1 convs,
upsamples them and adds one chunk to each downstream layer's logits. The cascade registers its
architectures with timm (`dvt_digits`, `dvt_cifar10`, `dvt_deit_small`) and records its own cost on the
ledger. `init_from_backbone` starts every stage from one pretrained ViT, as the paper fine-tunes its
stages from ImageNet-pretrained weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from tokenbench.reduce import (
    BenchError,
    BlockCost,
    CostLedger,
    Need,
    active_ledger,
    embed_macs,
    linear_macs_per_token,
    norm_macs_per_token,
    run_attention,
)

from .thresholds import exit_score


class PaddedPatchEmbed(PatchEmbed):
    """A patch conv with symmetric zero padding, so grids that do not divide the image still cover it."""

    def __init__(self, *args, padding: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        k = self.patch_size[0]
        self.proj = nn.Conv2d(self.proj.in_channels, self.proj.out_channels, k, stride=k, padding=padding)
        self.grid_size = tuple((s + 2 * padding - k) // k + 1 for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]


@dataclass
class Context:
    """What a stage hands to the next: final tokens before the norm, and its layers' attention logits."""

    features: torch.Tensor  # [B, 1 + g*g, C]
    logits: torch.Tensor | None  # [B, L*H, 1 + g*g, 1 + g*g], pre-softmax, or None

    def select(self, index: torch.Tensor) -> "Context":
        return Context(self.features[index], None if self.logits is None else self.logits[index])


class EarlyExitDVT(nn.Module):
    """A cascade with fixed exit thresholds on an exit criterion: what the harness measures."""

    def __init__(self, cascade: DVTCascade, thresholds, criterion: str = "confidence"):
        super().__init__()
        self.cascade = cascade
        self.thresholds = [float(t) for t in thresholds]
        self.criterion = criterion

    def forward(self, images):
        return self.cascade(images, self.thresholds, self.criterion)


def upsample_grid(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Resample the patch axis `dim` of `t` (g*g tokens) to size*size: nearest-upsample, then average-pool.

    As the official code: nearest by an integer factor to at least `size` (7 -> 14 -> 10, 10 -> 20 -> 14),
    then adaptive average pooling to the target grid. The other axes are the channels of channels-last
    g x g planes, which CPU kernels resample about three times faster than the same planes one by one
    (relation reuse resamples millions of them), with the same result bit for bit: the copy of nearest
    upsampling trivially, the pooling where its windows' areas are powers of two (4 -> 8 -> 6, 6 -> 12 -> 8).
    Elsewhere the vectorised kernel divides once by a window's area where the per-plane one divides by its
    height, then width, so those grids pool plane by plane.
    """
    t = t.movedim(dim, -2)
    lead, g, channels = t.shape[:-2], math.isqrt(t.shape[-2]), t.shape[-1]
    planes = t.reshape(-1, g, g, channels).permute(0, 3, 1, 2)
    planes = F.interpolate(planes, scale_factor=math.ceil(size / g), mode="nearest")
    if not power_of_two_windows(planes.shape[-1], size):
        planes = planes.contiguous()
    planes = F.adaptive_avg_pool2d(planes, size)
    return planes.permute(0, 2, 3, 1).reshape(*lead, size * size, channels).movedim(-2, dim)


def power_of_two_windows(n: int, size: int) -> bool:
    """Whether every window of adaptive pooling from n to `size` cells (along one axis) spans a power of two."""
    widths = {-(-(i + 1) * n // size) - i * n // size for i in range(size)}
    return all(w & (w - 1) == 0 for w in widths)


class Stage(nn.Module):
    """One exit of the cascade: a timm ViT, optionally reusing the previous stage's features and relations."""

    def __init__(self, vit: VisionTransformer, upstream: "Stage | None" = None, feature_reuse: bool = False,
                 relation_reuse: bool = False, reuse_hidden: int = 128, reuse_dim: int = 48):
        super().__init__()
        self.vit = vit
        self.grid = vit.patch_embed.grid_size[0]
        self.export_logits = False  # set by the cascade when the next stage reuses relations
        dim = vit.embed_dim
        self.feature_embed = None
        self.relation = None
        if upstream is not None and feature_reuse:
            # Per block, its own LN-MLP to a narrow embedding, and an MLP whose input is widened to take it.
            self.feature_embed = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(upstream.vit.embed_dim), Mlp(upstream.vit.embed_dim, reuse_hidden, reuse_dim))
                for _ in vit.blocks)
            for blk in vit.blocks:
                hidden = blk.mlp.fc1.out_features
                blk.norm2 = nn.LayerNorm(dim + reuse_dim)
                blk.mlp = Mlp(dim + reuse_dim, hidden, dim)
        if upstream is not None and relation_reuse:
            up = len(upstream.vit.blocks) * upstream.vit.blocks[0].attn.num_heads
            here = len(vit.blocks) * vit.blocks[0].attn.num_heads
            self.relation = nn.Sequential(nn.Conv2d(up, 3 * up, 1), nn.GELU(), nn.Conv2d(3 * up, here, 1))
            upstream.export_logits = True
        self.costs = [BlockCost.of(blk) for blk in vit.blocks]
        self._fixed_macs = embed_macs(vit.patch_embed) + linear_macs_per_token(vit.head) + norm_macs_per_token(vit.fc_norm)

    def reuse_macs(self, n_up: int) -> tuple[int, int]:
        """(MACs, norm part) of the reuse modules for an upstream stage of `n_up` tokens (resampling counts nothing)."""
        macs = norm = 0
        if self.feature_embed is not None:
            norm = norm_macs_per_token(self.feature_embed) * (n_up - 1)
            macs += linear_macs_per_token(self.feature_embed) * (n_up - 1) + norm
        if self.relation is not None:
            macs += sum(m.weight.numel() for m in self.relation if isinstance(m, nn.Conv2d)) * n_up * n_up
        return macs, norm

    def _features(self, context: Context) -> list[torch.Tensor]:
        patches = context.features[:, 1:]
        out = []
        for embed in self.feature_embed:
            e = upsample_grid(embed(patches), self.grid, dim=1)
            out.append(torch.cat([e.new_zeros(e.shape[0], 1, e.shape[2]), e], dim=1))
        return out

    def _relations(self, context: Context) -> torch.Tensor:
        """[L, B, H, N, N] attention-logit offsets, one per layer of this stage."""
        r = self.relation(context.logits)
        cls_cls, cls_row = r[..., :1, :1], upsample_grid(r[..., :1, 1:], self.grid, dim=-1)
        col = upsample_grid(r[..., 1:, :1], self.grid, dim=-2)
        patches = upsample_grid(upsample_grid(r[..., 1:, 1:], self.grid, dim=-1), self.grid, dim=-2)
        r = torch.cat([torch.cat([cls_cls, cls_row], -1), torch.cat([col, patches], -1)], -2)
        B, _, N, _ = r.shape
        heads = self.vit.blocks[0].attn.num_heads
        return r.reshape(B, len(self.vit.blocks), heads, N, N).transpose(0, 1)

    def forward(self, images: torch.Tensor, context: Context | None = None) -> tuple[torch.Tensor, Context]:
        vit = self.vit
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        n = x.shape[1]
        features = self._features(context) if self.feature_embed is not None and context is not None else None
        relations = self._relations(context) if self.relation is not None and context is not None else None
        needs = Need.LOGITS if self.export_logits else Need.NOTHING
        logits = []
        ledger = active_ledger()
        for i, blk in enumerate(vit.blocks):
            bias = None if relations is None else relations[i]
            attn_out, info, _ = run_attention(blk.attn, blk.norm1(x), bias, needs)
            x = x + blk.drop_path1(blk.ls1(attn_out))
            h = x if features is None else torch.cat([x, features[i]], dim=-1)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
            if self.export_logits:
                logits.append(info.logits)
            if ledger is not None:
                ledger.add_block(self.costs[i], n, n)
        out = Context(x, torch.cat(logits, dim=1) if logits else None)
        if ledger is not None:
            final_norm = norm_macs_per_token(vit.norm) * n
            ledger.add(self._fixed_macs + final_norm, final_norm)
            if context is not None:
                ledger.add(*self.reuse_macs(context.features.shape[1]))
        return vit.forward_head(vit.norm(x)), out


class DVTCascade(nn.Module):
    """The stages in order. `forward` runs them all and answers with the last exit (no early exit)."""

    def __init__(self, stages: list[Stage], feature_reuse: bool, relation_reuse: bool):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.feature_reuse, self.relation_reuse = feature_reuse, relation_reuse
        self.num_classes = stages[-1].vit.num_classes
        self.pretrained_cfg = self.default_cfg = stages[-1].vit.pretrained_cfg

    def forward_exits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The logits of every exit (training and calibration)."""
        outputs, context = [], None
        for stage in self.stages:
            logits, context = stage(images, context)
            outputs.append(logits)
        return outputs

    def forward(self, images: torch.Tensor, thresholds=None, criterion: str = "confidence") -> torch.Tensor:
        """Early exit: an image leaves at the first exit whose score (by default its max softmax; see
        `thresholds.exit_score`) reaches that exit's threshold.

        `thresholds` has one value per exit but the last (which always answers); None runs every stage.
        Only the images still running go to the next stage; the ledger records each image's own stages.
        """
        ledger = active_ledger()
        last = len(self.stages) - 1
        out = None
        running = torch.arange(images.shape[0], device=images.device)
        context = None
        if ledger is not None:
            for k in range(len(self.stages)):
                ledger.note(f"exit_{k + 1}", 0.0)
        for k, stage in enumerate(self.stages):
            with ledger.rows(running) if ledger is not None else contextlib.nullcontext():
                logits, context = stage(images[running], context)
                if k == last or thresholds is None:
                    leave = torch.full_like(running, k == last, dtype=torch.bool)
                else:
                    leave = exit_score(logits, images[running], criterion) >= thresholds[k]
                if ledger is not None:
                    ledger.note(f"exit_{k + 1}", leave)
            if out is None:
                out = logits.new_zeros(images.shape[0], logits.shape[1])
            out[running[leave]] = logits[leave]
            running, context = running[~leave], context.select(~leave)
            if running.numel() == 0:
                if ledger is not None:  # the blocks nobody ran: zero tokens, so every batch reports all blocks
                    with ledger.rows(running):
                        for later in self.stages[k + 1:]:
                            for cost in later.costs:
                                ledger.add_block(cost, 0, 0)
                break
        return out

    @torch.inference_mode()
    def exit_gmacs(self, image: torch.Tensor) -> np.ndarray:
        """Cumulative GMACs of answering at each exit (stages 1..k with their reuse), from the ledger."""
        costs, context = [], None
        with CostLedger(1) as ledger:
            for stage in self.stages:
                _, context = stage(image[:1], context)
                costs.append(ledger.gmacs.item())
        return np.array(costs)


def build_cascade(grids: list[dict], feature_reuse: bool, relation_reuse: bool, reuse_hidden: int, reuse_dim: int,
                  cfg_name: str, **vit_args) -> DVTCascade:
    """Stages of the same width with their own weights; `grids` gives each stage's patch size and padding."""
    from timm.models import build_model_with_cfg

    stages, upstream = [], None
    for g in grids:
        embed = partial(PaddedPatchEmbed, padding=g.get("padding", 0))
        vit = build_model_with_cfg(VisionTransformer, cfg_name, False, patch_size=g["patch"], embed_layer=embed,
                                   **vit_args)
        stage = Stage(vit, upstream, feature_reuse, relation_reuse, reuse_hidden, reuse_dim)
        stages.append(stage)
        upstream = stage
    return DVTCascade(stages, feature_reuse, relation_reuse)


@torch.no_grad()
def init_from_backbone(cascade: DVTCascade, backbone: VisionTransformer) -> None:
    """Start every stage from `backbone`'s weights: blocks, norms, class token and head copied, the patch
    embedding resampled to the stage's patch size (FlexiViT's pseudo-inverse resize) and the position
    embedding to its grid (bicubic). The reuse modules stay freshly initialised; a widened MLP (feature
    reuse) takes the backbone's weights on its first `dim` inputs and zeros on the reuse inputs, so it
    starts close to the backbone's MLP."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    source = backbone.state_dict()
    old_grid = list(backbone.patch_embed.grid_size)
    for stage in cascade.stages:
        vit = stage.vit
        target = vit.state_dict()
        if vit.embed_dim != backbone.embed_dim or len(vit.blocks) != len(backbone.blocks):
            raise BenchError(f"backbone is {len(backbone.blocks)} blocks of width {backbone.embed_dim}; the cascade's "
                             f"stages are {len(vit.blocks)} of width {vit.embed_dim}")
        for name, value in source.items():
            if name == "patch_embed.proj.weight":
                value = resample_patch_embed(value, list(vit.patch_embed.patch_size))
            elif name == "pos_embed":
                value = resample_abs_pos_embed(value, list(vit.patch_embed.grid_size), old_grid,
                                               num_prefix_tokens=vit.num_prefix_tokens)
            into = target[name]
            if into.shape == value.shape:
                into.copy_(value)
            elif name.endswith(("norm2.weight", "norm2.bias", "mlp.fc1.weight")):  # widened by feature reuse
                into.zero_()
                if name.endswith("norm2.weight"):
                    into.fill_(1.0)
                into[..., :value.shape[-1]].copy_(value)
            else:
                raise BenchError(f"backbone weight {name} {tuple(value.shape)} does not fit the cascade's "
                                 f"{tuple(into.shape)}")


# The embedded digits models' preprocessing (tokenbench.models.loading.DIGITS_PREPROCESSING; test_dvt checks they agree).
DIGITS_PREPROCESSING = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
                            crop_mode="center", interpolation="bilinear")

default_cfgs = generate_default_cfgs({
    "dvt_digits.tokenbench": dict(DIGITS_PREPROCESSING, num_classes=10, first_conv="stages.0.vit.patch_embed.proj",
                                  classifier="head", license="apache-2.0"),
    **{f"{name}.tokenbench": dict(
        input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_pct=1.0,
        crop_mode="center", interpolation="bilinear", num_classes=10, first_conv="stages.0.vit.patch_embed.proj",
        classifier="head", license="apache-2.0") for name in ("dvt_cifar10", "dvt_cifar10_v2", "dvt_cifar10_v3")},
    "dvt_deit_small.untrained": dict(
        input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875,
        num_classes=1000, first_conv="stages.0.vit.patch_embed.proj", classifier="head", license="apache-2.0"),
})


@register_model
def dvt_deit_small(pretrained=False, feature_reuse=True, relation_reuse=True, **kwargs) -> DVTCascade:
    """The paper's DeiT-S cascade at 224: 7x7 (patch 32), 10x10 (k=23 stride 23, padding 3), 14x14 (patch 16)."""
    if pretrained:
        raise BenchError("no pretrained DVT weights are available offline; train with tokenbench train --method dvt")
    grids = [{"patch": 32}, {"patch": 23, "padding": 3}, {"patch": 16}]
    args = dict(img_size=224, embed_dim=384, depth=12, num_heads=6, num_classes=1000)
    return build_cascade(grids, feature_reuse, relation_reuse, 128, 48, "dvt_deit_small", **dict(args, **kwargs))


@register_model
def dvt_digits(pretrained=False, feature_reuse=True, relation_reuse=True, **kwargs) -> DVTCascade:
    """The embedded default: three 4-block ViTs (dim 64, 2 heads) on 32x32 digits at 4x4, 6x6, 8x8 tokens."""
    if pretrained:
        raise BenchError("dvt_digits weights ship as methods/dvt/weights/dvt_digits.pt; load them with --checkpoint")
    grids = [{"patch": 8}, {"patch": 6, "padding": 2}, {"patch": 4}]
    args = dict(img_size=32, embed_dim=64, depth=4, num_heads=2, num_classes=10)
    return build_cascade(grids, feature_reuse, relation_reuse, 32, 16, "dvt_digits", **dict(args, **kwargs))


@register_model
def dvt_cifar10(pretrained=False, feature_reuse=True, relation_reuse=True, **kwargs) -> DVTCascade:
    """vit_cifar10's width and depth (12 blocks, dim 64, 2 heads) on 4x4, 6x6, 8x8 tokens of 32x32 images."""
    if pretrained:
        raise BenchError("dvt_cifar10 weights ship as methods/dvt/weights/dvt_cifar10*.pt; load them with --checkpoint")
    grids = [{"patch": 8}, {"patch": 6, "padding": 2}, {"patch": 4}]
    args = dict(img_size=32, embed_dim=64, depth=12, num_heads=2, num_classes=10)
    return build_cascade(grids, feature_reuse, relation_reuse, 32, 16, "dvt_cifar10", **dict(args, **kwargs))


def wide_cifar10_cascade(name, pretrained, feature_reuse, relation_reuse, **kwargs) -> DVTCascade:
    """The cascade of vit_cifar10_v2's (and v3's) width and depth (12 blocks, dim 192, 3 heads, MLP ratio 2) on
    4x4, 6x6, 8x8 tokens; the feature-reuse MLP scaled from DeiT-S's 384 -> 128 -> 48 to 192 -> 64 -> 24."""
    if pretrained:
        raise BenchError(f"{name} weights ship as methods/dvt/weights/{name}.pt; load them with --checkpoint")
    grids = [{"patch": 8}, {"patch": 6, "padding": 2}, {"patch": 4}]
    args = dict(img_size=32, embed_dim=192, depth=12, num_heads=3, mlp_ratio=2.0, num_classes=10)
    return build_cascade(grids, feature_reuse, relation_reuse, 64, 24, name, **dict(args, **kwargs))


@register_model
def dvt_cifar10_v2(pretrained=False, feature_reuse=True, relation_reuse=True, **kwargs) -> DVTCascade:
    """DVT on vit_cifar10_v2 (`wide_cifar10_cascade`)."""
    return wide_cifar10_cascade("dvt_cifar10_v2", pretrained, feature_reuse, relation_reuse, **kwargs)


@register_model
def dvt_cifar10_v3(pretrained=False, feature_reuse=True, relation_reuse=True, **kwargs) -> DVTCascade:
    """DVT on vit_cifar10_v3, v2's architecture trained on (`wide_cifar10_cascade`)."""
    return wide_cifar10_cascade("dvt_cifar10_v3", pretrained, feature_reuse, relation_reuse, **kwargs)
