"""Downsample: the unmodified model run at a lower input resolution, the baseline every board must beat.

Each image is resized to `scale` times the model's input side (rounded to whole patches, at least one:
side = patch x max(1, round(scale x grid))), bilinearly with antialiasing, and the model runs unchanged at
that size with its position embedding resampled once as timm does (`VisionTransformer.set_input_size`:
bicubic, antialiased; prefix tokens' embeddings untouched). Fewer patches means fewer tokens in every
block, so the sweep's scales (0.875 to 0.5 of the side, 77 % to 25 % of the tokens) span the GMACs of
the token-reduction methods. Resizing the normalised tensor equals normalising the resized image, since
both steps are linear per channel. The resize itself is not charged to the GMACs (a few MACs per pixel).
Recent benchmarks of token compression (e.g. Wen et al., "Token Pruning in Multimodal Large Language
Models: Are We Solving the Right Problem?", 2025) found this baseline beats many methods at equal cost.
No official code: the rule is the one timm applies to run a ViT at another resolution.
"""

import copy

import torch.nn as nn
import torch.nn.functional as F

from tokenbench.reduce import BenchError, Knob, Method, TokenReducedViT, register_method


class LowResolutionViT(TokenReducedViT):
    """`vit` at `size` (H, W): a copy whose position embedding is resampled; images are resized first."""

    def __init__(self, vit: nn.Module, size: tuple[int, int]):
        low = copy.deepcopy(vit)
        low.set_input_size(img_size=size)
        super().__init__(low)
        self.size = size

    def forward(self, images):
        return super().forward(self.resize(images))

    def trace(self, images):
        return super().trace(self.resize(images))

    def resize(self, images):
        if tuple(images.shape[-2:]) == self.size:
            return images
        return F.interpolate(images, size=self.size, mode="bilinear", antialias=True, align_corners=False)


@register_method
class Downsample(Method):
    name = "downsample"
    family = "resolution"
    knobs = (Knob("scale", (0.875, 0.75, 0.625, 0.5), noop=1.0, kind=float, low=0.0, high=1.0,
                  help="input side as a fraction of the model's (rounded to whole patches)"),)
    summary = "run the unmodified model at a lower input resolution (timm's resampled position embedding)"

    def check_model(self, model):
        super().check_model(model)
        if model.patch_embed.proj.weight.ndim != 4:
            raise BenchError("downsample resizes 2-D images; this model embeds video (3-D patches)")

    def build(self, model, scale=1.0):
        grid, patch = model.patch_embed.grid_size, model.patch_embed.patch_size
        size = tuple(p * max(1, round(scale * g)) for g, p in zip(grid, patch))
        if size == tuple(model.patch_embed.img_size):
            return TokenReducedViT(model)
        return LowResolutionViT(model, size)
