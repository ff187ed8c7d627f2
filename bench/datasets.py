"""The datasets tokenbench evaluates on, by name, each through the model's own eval preprocessing."""

from __future__ import annotations

from typing import Callable

import torch

from tokenbench import data, video, video_data
from tokenbench.data import SPLITS, DatasetInfo
from tokenbench.errors import BenchError

DATASETS: dict[str, Callable[..., DatasetInfo]] = {
    "digits": data.digits, "cifar10": data.cifar10, "cifar100": data.cifar100, "imagenet": data.imagenet,
    "folder": data.folder, "moving-digits": video_data.moving_digits, "kinetics400": video_data.kinetics400,
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def build_dataset(name: str, split: str, transform: Callable, root: str | None = None, **options) -> DatasetInfo:
    if name not in DATASETS:
        raise BenchError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    if split not in SPLITS:
        raise BenchError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return DATASETS[name](split=split, transform=transform, root=root, **options)


def eval_transform(model: torch.nn.Module, protocol: str | None = None):
    """The model's eval preprocessing, from its pretrained config; video models sample views by `protocol`."""
    from timm.data import create_transform, resolve_data_config

    if isinstance(model, video.VideoVisionTransformer):
        return video_data.eval_transform(model, protocol)
    if protocol is not None:
        raise BenchError("a video protocol applies to video models only")
    return create_transform(**resolve_data_config({}, model=model))
