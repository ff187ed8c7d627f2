"""Building backbones: any timm model by name, weights from a local checkpoint, timm's pretrained
loading, or the embedded default (`vit_digits`, trained by `tokenbench train` and shipped in
`bench/models/assets`).

Checkpoints written by tokenbench are self-describing dicts: `{"model": name, "model_kwargs": {...},
"state_dict": ..., "meta": {...}}`, always read with `weights_only=True`. Plain state dicts (or timm /
DeiT style `{"model": state_dict}` / `{"state_dict": ...}`) load too.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from tokenbench.errors import BenchError
from tokenbench.models import video
from tokenbench.reduce.registry import get_method

EMBEDDED_WEIGHTS = {"vit_digits": "vit_digits.pt", "vit_cifar10": "vit_cifar10.pt",
                    "vit_cifar10_v2": "vit_cifar10_v2.pt", "vit_cifar10_v3": "vit_cifar10_v3.pt",
                    "vit_video_digits": "vit_video_digits.pt"}


DIGITS_PREPROCESSING = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
                           crop_mode="center", interpolation="bilinear")
"""The timm data config of every model on `digits`: the 8x8 scans upscaled to 32x32, scaled to [-1, 1]."""


def asset(name: str) -> Path:
    """A weights file shipped inside the package (`bench/models/assets` in the checkout)."""
    return Path(str(importlib.resources.files("tokenbench.models") / "assets" / name))

default_cfgs = generate_default_cfgs({
    "vit_digits.tokenbench": dict(DIGITS_PREPROCESSING, num_classes=10, first_conv="patch_embed.proj",
                                  classifier="head", license="apache-2.0"),
    **{f"{name}.tokenbench": dict(
        input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_pct=1.0,
        crop_mode="center", interpolation="bilinear", num_classes=10, first_conv="patch_embed.proj",
        classifier="head", license="apache-2.0") for name in ("vit_cifar10", "vit_cifar10_v2", "vit_cifar10_v3")},
})


@register_model
def vit_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The embedded default: a 12-block ViT (dim 96, 3 heads) on 32x32 digits, 4x4 patches, 65 tokens."""
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=12, num_heads=3, num_classes=10)
    return build_model_with_cfg(VisionTransformer, "vit_digits", pretrained, **dict(args, **kwargs))


@register_model
def vit_cifar10(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The CIFAR reference at native 32x32: 12 blocks (dim 64, 2 heads), 4x4 patches, 65 tokens."""
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=2, num_classes=10)
    return build_model_with_cfg(VisionTransformer, "vit_cifar10", pretrained, **dict(args, **kwargs))


WIDE_CIFAR10 = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=2.0, num_classes=10)
"""vit_cifar10_v2's and v3's architecture: DeiT-Tiny's width (dim 192, 3 heads of 64), MLP ratio 2, 12 blocks."""


@register_model
def vit_cifar10_v2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The second CIFAR reference (stronger; v1's weights stay as `vit_cifar10`): 12 blocks of DeiT-Tiny's
    width (dim 192, 3 heads of 64) with MLP ratio 2 at native 32x32, 4x4 patches, 65 tokens."""
    return build_model_with_cfg(VisionTransformer, "vit_cifar10_v2", pretrained, **dict(WIDE_CIFAR10, **kwargs))


@register_model
def vit_cifar10_v3(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The third CIFAR reference: v2's architecture trained on from v2's weights by a second schedule (v2's
    weights stay as `vit_cifar10_v2`)."""
    return build_model_with_cfg(VisionTransformer, "vit_cifar10_v3", pretrained, **dict(WIDE_CIFAR10, **kwargs))


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    weights: str  # what the results row records: embedded / file / timm tag / random-init, with a hash
    meta: dict


def input_shape(model: nn.Module) -> tuple:
    """The input a model takes, without the batch: its pretrained config's size, else its patch grid's image."""
    size = model.pretrained_cfg.get("input_size")
    return tuple(size) if size else (3, *model.patch_embed.img_size)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unreadable_checkpoint(path: Path, err: Exception) -> str:
    """What is wrong with a checkpoint torch could not load, without torch's advice to unpickle it anyway."""
    text = str(err)
    if "Weights only load failed" in text or "weights_only" in text:
        return (f"checkpoint {path} holds objects other than tensors and plain data, which tokenbench does not "
                "unpickle (it could run code); save the model's state_dict instead (torch.save(model.state_dict(), "
                "path), or tokenbench.models.loading.save_checkpoint)")
    first = text.splitlines()[0] if text else type(err).__name__
    return f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint ({first})"


# Data, not code: the uint32 numpy arrays of a resume state's random streams, rebuilt from their bytes (torch's
# weights-only unpickler refuses numpy by default).
NUMPY_ARRAYS = [getattr(np, "_core", np.core).multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict, read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAYS):  # a resume state's random streams are numpy arrays
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise BenchError(unreadable_checkpoint(path, err)) from None
    if not isinstance(obj, dict):
        raise BenchError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _state_dict(obj: dict) -> dict:
    if isinstance(obj.get("identity"), dict) and isinstance(obj.get("ema"), dict):  # a `tokenbench train` resume state: its EMA,
        return obj["ema"]                                       # the weights its val top-1 and probes measured
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


MODEL_ENTRY_POINTS = "tokenbench.models"  # plugin modules that register timm models when imported


def create(name: str, **kwargs) -> nn.Module:
    """timm's model `name`; a name timm does not know yet is looked up in the plugins' model modules."""
    if not timm.is_model(name):
        register_plugin_models()
    if not timm.is_model(name):
        raise BenchError(f"unknown model {name!r}: not a timm model name (see timm.list_models())")
    return timm.create_model(name, **kwargs)


@functools.cache
def register_plugin_models() -> None:
    """Import every module of the `tokenbench.models` entry-point group (each registers its models with timm)."""
    for ep in importlib.metadata.entry_points(group=MODEL_ENTRY_POINTS):
        try:
            ep.load()
        except Exception as err:
            raise BenchError(f"model plugin {ep.name!r} ({ep.value}) failed to import: {err}") from None


def pretrained_weights_label(model: nn.Module, name: str) -> str:
    """timm's pretrained tag, with the Hugging Face snapshot it came from (the exact weights) when cached."""
    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return f"timm:{name}"
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return f"timm:{hub_id}@{Path(path).parent.name[:12]}"
    return f"timm:{hub_id}"


def load_model(name: str | None = None, checkpoint: str | Path | None = None, pretrained: bool = False,
               num_classes: int | None = None) -> LoadedModel:
    """Build `name` (or the model a tokenbench checkpoint names) with the requested weights, in eval mode."""
    if checkpoint is None and not pretrained and name in EMBEDDED_WEIGHTS:
        checkpoint, label = asset(EMBEDDED_WEIGHTS[name]), "embedded"
    else:
        label = "file"
    if checkpoint is not None and Path(checkpoint).is_dir():
        return load_videomae_folder(Path(checkpoint))
    if checkpoint is not None:
        obj = read_checkpoint(checkpoint)
        name = obj.get("model") if isinstance(obj.get("model"), str) else name
        identity = obj.get("identity")  # a resume state names its model there
        name = identity.get("model") or name if isinstance(identity, dict) else name
        if name is None:
            raise BenchError(f"checkpoint {checkpoint} does not name its model; pass --model")
        state = _state_dict(obj)
        kwargs = dict(obj.get("model_kwargs", {}))
        head = state.get("head.weight")
        if head is not None:
            kwargs["num_classes"] = head.shape[0]
        model = create(name, **kwargs)
        trained_with = obj.get("meta", {}).get("trained_with")
        if trained_with:
            get_method(trained_with).attach(model)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a tensor of the wrong shape
            mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
            raise BenchError(f"checkpoint {checkpoint} does not fit {name}: {mismatch}") from None
        if missing or unexpected:
            raise BenchError(f"checkpoint {checkpoint} does not fit {name}: "
                             f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:2]})")
        path = Path(checkpoint)
        weights = f"{label}:{path.name}@sha256:{file_sha256(path)[:12]}"
        meta = dict(obj.get("meta", {}))
    else:
        if name is None:
            raise BenchError("no model given")
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        if pretrained:
            try:
                model = create(name, pretrained=True, **kwargs)
            except BenchError:
                raise
            except Exception as err:
                raise BenchError(f"could not load pretrained weights for {name}: {str(err).splitlines()[0]} "
                                 "(offline? pass --checkpoint FILE)") from None
            weights = pretrained_weights_label(model, name)
        else:
            model = create(name, **kwargs)
            weights = "random-init"
        meta = {}
    return LoadedModel(model.eval(), name, weights, meta)


def load_videomae_folder(folder: Path) -> LoadedModel:
    """A Hugging Face VideoMAE classifier folder (config.json + weights), mapped onto our video ViT."""
    try:
        model, config, files = video.load_videomae(folder)
    except BenchError:
        raise
    except Exception as err:  # a bad config.json, tensors of the wrong shape, a truncated weights file
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line),
                      str(err).splitlines()[0] if str(err) else "")
        raise BenchError(f"cannot load the VideoMAE folder {folder}: {type(err).__name__}: {detail}") from None
    digest = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
    meta = {"source": "huggingface-videomae", "config": config.get("_name_or_path") or folder.name}
    return LoadedModel(model, f"videomae:{folder.name}", f"file:{folder.name}@sha256:{digest[:12]}", meta)


def save_checkpoint(path: str | Path, model: nn.Module, name: str, meta: dict, model_kwargs: dict | None = None):
    """Write a self-describing tokenbench checkpoint (tensors and plain data only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"model": name, "model_kwargs": model_kwargs or {}, "state_dict": state, "meta": meta}, path)


def rename_checkpoint(path: str | Path, name: str, out: str | Path) -> None:
    """Write the checkpoint at `path` to `out` as model `name`, an architecture of the same shapes.

    A backbone trained on with `tokenbench train --init` keeps its initial model's name; shipping it as a new
    model (v2's weights trained on ship as `vit_cifar10_v3`) needs the name changed. The weights must fit `name`
    exactly; the meta records the name it was trained as."""
    loaded, kwargs = load_model(checkpoint=path), read_checkpoint(path).get("model_kwargs", {})
    model = create(name, num_classes=loaded.model.num_classes, **kwargs)
    try:
        model.load_state_dict(loaded.model.state_dict())
    except RuntimeError as err:
        raise BenchError(f"checkpoint {path} does not fit {name}: {str(err).splitlines()[0]}") from None
    save_checkpoint(out, model, name, dict(loaded.meta, trained_as=loaded.name), kwargs)
