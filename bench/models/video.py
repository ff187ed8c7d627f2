"""Video ViTs built from timm's blocks: tubelet embedding, joint space-time attention.

`VideoVisionTransformer` is a timm `VisionTransformer` whose patch embedding is a `TubeletEmbed`
(a Conv3d over non-overlapping t x p x p tubelets, tokens flattened time-major as VideoMAE does), so
the input is [B, C, T, H, W] and every token attends to every other across space and time. Nothing
else changes: `tokenbench.tokens.TokenReducedViT` wraps it as it wraps an image ViT, the ledger counts its
embedding (kernel size x tubelets), and every block-level method applies to video tokens unchanged.

Registered models: `vit_video_digits` (the embedded default for `moving-digits`, trained by
`tokenbench train` and shipped in `bench/models/assets`), and the VideoMAE shapes (`videomae_{small,base,
large}_patch16_224`: 16 frames, 2x16x16 tubelets, 1,568 tokens, no class token, mean pooling with
`fc_norm`, fixed sinusoid positions). `load_videomae(folder)` reads a Hugging Face
`VideoMAEForVideoClassification` folder (config.json + safetensors or pytorch_model.bin) into them by key mapping.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from tokenbench.errors import BenchError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TubeletEmbed(nn.Module):
    """[B, C, T, H, W] video -> [B, T/t * H/p * W/p, D] tokens by a Conv3d over t x p x p tubelets."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, num_frames=16,
                 tubelet_size=2, device=None, dtype=None, **unused):
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        if num_frames % tubelet_size or any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise BenchError(f"{num_frames} frames of {self.img_size} do not tile into "
                             f"{tubelet_size}x{self.patch_size} tubelets")
        self.grid_size = (num_frames // tubelet_size,) + tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = math.prod(self.grid_size)
        kernel = (tubelet_size, *self.patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel, bias=bias,
                              device=device, dtype=dtype)

    def feat_ratio(self, as_scalar=True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.num_frames, *self.img_size)
        if x.ndim != 5 or tuple(x.shape[2:]) != expected:
            raise BenchError(f"this video model takes [B, C, T, H, W] clips with T, H, W = {expected}; "
                             f"got {list(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention is all you need" (VideoMAE's), [1, positions, dim]."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2) / dim
    angle = position / torch.pow(10000.0, exponent.to(torch.float64))
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    return table.float()[None]


class VideoVisionTransformer(VisionTransformer):
    """A timm ViT on [B, C, T, H, W] clips: tubelet tokens, joint space-time attention.

    `protocol` is the model's default evaluation sampling, FRAMESxSTRIDExCLIPSxCROPS (see
    `bench.video_data.VideoProtocol`); `fixed_pos_embed` freezes the position table to VideoMAE's sinusoids.
    """

    def __init__(self, num_frames: int = 16, tubelet_size: int = 2, fixed_pos_embed: bool = False,
                 protocol: str | None = None, **kwargs):
        embed = partial(TubeletEmbed, num_frames=num_frames, tubelet_size=tubelet_size)
        super().__init__(embed_layer=embed, **kwargs)
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        self.protocol = protocol or f"{num_frames}x1x1x1"
        if fixed_pos_embed:
            with torch.no_grad():
                self.pos_embed.copy_(sinusoid_table(self.pos_embed.shape[1], self.embed_dim))
            self.pos_embed.requires_grad_(False)


def _cfg(**kwargs):
    return dict(dict(num_classes=400, mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="patch_embed.proj",
                     classifier="head"), **kwargs)


default_cfgs = generate_default_cfgs({
    "vit_video_digits.tokenbench": _cfg(input_size=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3,
                                        license="apache-2.0"),
    "videomae_small_patch16_224.untrained": _cfg(input_size=(3, 224, 224)),
    "videomae_base_patch16_224.untrained": _cfg(input_size=(3, 224, 224)),
    "videomae_large_patch16_224.untrained": _cfg(input_size=(3, 224, 224)),
})


def _create(name: str, pretrained: bool, defaults: dict, kwargs: dict) -> VideoVisionTransformer:
    if pretrained:
        raise BenchError(f"{name} has no hub weights here; load a local folder with --checkpoint DIR")
    return build_model_with_cfg(VideoVisionTransformer, name, False, **dict(defaults, **kwargs))


@register_model
def vit_video_digits(pretrained: bool = False, **kwargs) -> VideoVisionTransformer:
    """The embedded video default: 8 frames of 32x32, 4x4x4 tubelets (2 x 8 x 8 = 128 tokens), 12 blocks of
    dim 96, no class token, mean pooling (VideoMAE's head), so class-token methods use the substitute.
    Small enough to train in minutes on a shared CPU."""
    args = dict(img_size=32, patch_size=4, num_frames=8, tubelet_size=4, embed_dim=96, depth=12, num_heads=3,
                num_classes=10, class_token=False, global_pool="avg", protocol="8x1x1x1")
    return _create("vit_video_digits", pretrained, args, kwargs)


def _videomae(name: str, embed_dim: int, depth: int, num_heads: int, pretrained: bool, kwargs: dict):
    """VideoMAE's fine-tuning model: 16x224x224 clips, 2x16x16 tubelets, mean pooling, fixed sinusoids."""
    args = dict(img_size=224, patch_size=16, num_frames=16, tubelet_size=2, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, num_classes=400, class_token=False, global_pool="avg", fixed_pos_embed=True,
                protocol="16x4x5x3")
    return _create(name, pretrained, args, kwargs)


@register_model
def videomae_small_patch16_224(pretrained: bool = False, **kwargs) -> VideoVisionTransformer:
    return _videomae("videomae_small_patch16_224", 384, 12, 6, pretrained, kwargs)


@register_model
def videomae_base_patch16_224(pretrained: bool = False, **kwargs) -> VideoVisionTransformer:
    return _videomae("videomae_base_patch16_224", 768, 12, 12, pretrained, kwargs)


@register_model
def videomae_large_patch16_224(pretrained: bool = False, **kwargs) -> VideoVisionTransformer:
    return _videomae("videomae_large_patch16_224", 1024, 24, 16, pretrained, kwargs)


# --- Hugging Face VideoMAE checkpoints ---------------------------------------------------------------

def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Every tensor of a Hugging Face folder: `model.safetensors`, else `pytorch_model.bin` (read with
    weights_only=True, so no code is unpickled), either possibly sharded with an index file."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{name}.index.json"
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            break
        if (folder / name).is_file():
            files = [folder / name]
            break
    else:
        raise BenchError(f"{folder} has neither model.safetensors nor pytorch_model.bin; expected a Hugging Face "
                         "VideoMAE folder (config.json and the weights)")
    state = {}
    for f in files:
        if not f.is_file():
            raise BenchError(f"{folder} lacks {f.name}, a shard its index lists")
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(f))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state, files


def videomae_kwargs(config: dict) -> dict:
    """VideoVisionTransformer arguments from a Hugging Face VideoMAEConfig."""
    if config.get("model_type") != "videomae":
        raise BenchError(f"config.json describes model_type {config.get('model_type')!r}, not 'videomae'")
    if not config.get("use_mean_pooling", True):
        raise BenchError("only mean-pooling VideoMAE classifiers are supported (use_mean_pooling=true)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise BenchError(f"hidden_act {config['hidden_act']!r} is not supported (VideoMAE uses gelu)")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    num_classes = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 400)
    return dict(img_size=config["image_size"], patch_size=config["patch_size"], in_chans=config.get("num_channels", 3),
                num_frames=config["num_frames"], tubelet_size=config["tubelet_size"], embed_dim=dim,
                depth=config["num_hidden_layers"], num_heads=heads, mlp_ratio=config["intermediate_size"] / dim,
                qkv_bias=config.get("qkv_bias", True), num_classes=num_classes,
                norm_layer=partial(nn.LayerNorm, eps=config.get("layer_norm_eps", 1e-12)))


def videomae_state_dict(hf: dict[str, torch.Tensor], depth: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """Hugging Face VideoMAE keys -> ours. Queries and values have biases, keys none: qkv.bias = [q, 0, v]."""
    hf = {k.removeprefix("videomae."): v for k, v in hf.items()}
    used = set()

    def take(key):
        if key not in hf:
            raise BenchError(f"the VideoMAE checkpoint lacks {key!r}")
        used.add(key)
        return hf[key]

    out = {"patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias")}
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = src + "attention.attention."
        q, k, v = (take(attn + f"{n}.weight") for n in ("query", "key", "value"))
        out[dst + "attn.qkv.weight"] = torch.cat([q, k, v])
        if qkv_bias:
            q_bias, v_bias = take(attn + "q_bias"), take(attn + "v_bias")
            out[dst + "attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                             ("mlp.fc2", "output.dense"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            for p in ("weight", "bias"):
                out[f"{dst}{ours}.{p}"] = take(f"{src}{theirs}.{p}")
    for ours, theirs in (("fc_norm", "fc_norm"), ("head", "classifier")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    left = sorted(set(hf) - used)
    if left:
        raise BenchError(f"the VideoMAE checkpoint has {len(left)} keys this model does not use (e.g. {left[:2]})")
    return out


def load_videomae(folder: str | Path) -> tuple[VideoVisionTransformer, dict, list[Path]]:
    """A Hugging Face `VideoMAEForVideoClassification` folder as a VideoVisionTransformer in eval mode.

    Returns (model, config, weight files). The sinusoid positions are not stored by Hugging Face; they
    are recomputed. Block norms use the config's `layer_norm_eps`; `fc_norm` keeps torch's default 1e-5
    as Hugging Face builds it.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BenchError(f"{folder} has no config.json; expected a Hugging Face VideoMAE folder")
    config = json.loads(config_path.read_text())
    kwargs = videomae_kwargs(config)
    hf_state, files = read_hf_weights(folder)
    model = VideoVisionTransformer(class_token=False, global_pool="avg", fixed_pos_embed=True,
                                   protocol=f"{kwargs['num_frames']}x4x5x3", **kwargs)
    model.fc_norm = nn.LayerNorm(model.embed_dim)
    state = videomae_state_dict(hf_state, kwargs["depth"], kwargs["qkv_bias"])
    state["pos_embed"] = model.pos_embed.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BenchError(f"VideoMAE weights in {folder} do not fit: missing {missing[:2]}, unexpected {unexpected[:2]}")
    return model.eval(), config, files
