"""One small random-init configuration of every timm family users ask about: what the conformance suite and
the support table (`tokenbench support`) run every method on. Small, so the matrix fits the everyday loop."""

from __future__ import annotations

import timm
import torch.nn as nn

SMALL = dict(img_size=64, depth=8, embed_dim=48, num_heads=3)  # depth 8: reduction at blocks 2, 4, 6
SUPPORTED = {  # timm name -> what changes from SMALL
    "deit_small_patch16_224": {}, "deit_small_distilled_patch16_224": {}, "deit3_small_patch16_224": {},
    "vit_small_patch16_224": {}, "vit_base_patch16_clip_224": {}, "vit_base_patch16_clip_quickgelu_224": {},
    "vit_small_patch14_dinov2": dict(img_size=56), "vit_small_patch14_reg4_dinov2": dict(img_size=56),
    "vit_base_patch16_224": dict(global_pool="avg"),  # MAE-style: average pool with fc_norm
    "vit_medium_patch16_gap_256": {},
    "vit_base_patch16_siglip_224": {},  # attention-pool (MAP) head, no class token
}
REFUSED = {  # timm name -> its whole small configuration
    "swin_tiny_patch4_window7_224": dict(img_size=64, embed_dim=24, depths=(1, 1), num_heads=(1, 2), window_size=4),
    "eva02_small_patch14_224": dict(img_size=56, depth=2, embed_dim=48, num_heads=3),
    "beit_base_patch16_224": dict(img_size=64, depth=2, embed_dim=48, num_heads=3),
    "resnet18": {},
}


def small_model(name: str) -> nn.Module:
    """The small random-init configuration of family `name`, in eval mode."""
    kwargs = REFUSED[name] if name in REFUSED else {**SMALL, **SUPPORTED[name]}
    return timm.create_model(name, **kwargs).eval()
