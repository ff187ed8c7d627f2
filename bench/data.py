"""Datasets: a registry of builders returning torch datasets of (image tensor, label).

Every dataset is preprocessed with the model's own eval transform (timm's `resolve_data_config` /
`create_transform`), so a user's model gets the preprocessing it was trained with.

The embedded default, `digits`, is scikit-learn's handwritten digits (1,797 real 8x8 scans shipped
inside scikit-learn) split once, stratified and seeded, into train / val / test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bench.registry import BenchError

SPLITS = ("train", "val", "test")
_DATASETS: dict[str, Callable[..., "DatasetInfo"]] = {}


@dataclass
class DatasetInfo:
    dataset: Dataset
    name: str
    split: str
    num_classes: int
    unreadable: int = 0  # images that could not be decoded and were left out
    missing: int = 0  # listed files that are not there (videos lost to YouTube attrition)
    views: int = 1  # views per item (video clips x crops): items are [views, ...] when more than one


def register_dataset(name: str):
    def decorator(fn):
        _DATASETS[name] = fn
        return fn
    return decorator


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def build_dataset(name: str, split: str, transform: Callable, root: str | None = None, **options) -> DatasetInfo:
    if name not in _DATASETS:
        raise BenchError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    if split not in SPLITS:
        raise BenchError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return _DATASETS[name](split=split, transform=transform, root=root, **options)


def eval_transform(model: torch.nn.Module, protocol: str | None = None):
    """The model's eval preprocessing, from its pretrained config; video models sample views by `protocol`."""
    from timm.data import create_transform, resolve_data_config

    from bench import video, video_data

    if isinstance(model, video.VideoVisionTransformer):
        return video_data.eval_transform(model, protocol)
    if protocol is not None:
        raise BenchError("a video protocol applies to video models only")
    return create_transform(**resolve_data_config({}, model=model))


class ArrayImages(Dataset):
    """In-memory uint8 images [N, H, W] or [N, H, W, 3] with labels, as PIL images through `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i]).convert("RGB")), int(self.labels[i])


def digits_split(split: str):
    """scikit-learn's digits as uint8 images and labels; 60% train, 10% val, 30% test, stratified, seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    index = np.arange(len(images))
    train, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=0)
    val, test = train_test_split(rest, test_size=0.75, stratify=digits.target[rest], random_state=0)
    chosen = {"train": train, "val": val, "test": test}[split]
    return images[chosen], digits.target[chosen]


@register_dataset("digits")
def digits(split: str, transform: Callable, root: str | None = None) -> DatasetInfo:
    images, labels = digits_split(split)
    return DatasetInfo(ArrayImages(images, labels, transform), "digits", split, num_classes=10)


from bench import video_data  # noqa: E402,F401  (registers moving-digits and kinetics400)
