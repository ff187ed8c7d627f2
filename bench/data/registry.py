"""The datasets tokenbench evaluates on, by name, each through the model's own eval preprocessing.

A dataset is a builder `(split, transform, root=None, **options) -> DatasetInfo` named in the
`tokenbench.datasets` entry-point group; tokenbench's own `pyproject.toml` lists the built-ins exactly as a
plugin package lists its own. Names are read from the entry points alone, so `--dataset`'s help and its
errors cost no import.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Callable

from tokenbench.errors import BenchError

if TYPE_CHECKING:
    import torch

    from tokenbench.data.images import DatasetInfo

ENTRY_POINT_GROUP = "tokenbench.datasets"
DATASETS: dict[str, Callable[..., DatasetInfo] | importlib.metadata.EntryPoint] = {}  # name -> builder


def _known() -> dict:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        DATASETS.setdefault(ep.name, ep)
    return DATASETS


def dataset_names() -> list[str]:
    return sorted(_known())


def dataset_builder(name: str) -> Callable[..., DatasetInfo]:
    """The builder of dataset `name`, imported on first use (a broken plugin is named)."""
    known = _known()
    if name not in known:
        raise BenchError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    builder = known[name]
    if isinstance(builder, importlib.metadata.EntryPoint):
        try:
            known[name] = builder = builder.load()
        except Exception as err:
            raise BenchError(f"dataset plugin {name!r} ({builder.value}) failed to import: {err}") from None
    return builder


def build_dataset(name: str, split: str, transform: Callable, root: str | None = None, **options) -> DatasetInfo:
    from tokenbench.data.images import SPLITS

    builder = dataset_builder(name)
    if split not in SPLITS:
        raise BenchError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return builder(split=split, transform=transform, root=root, **options)


def eval_transform(model: torch.nn.Module, protocol: str | None = None):
    """The model's eval preprocessing, from its pretrained config; video models sample views by `protocol`."""
    from timm.data import create_transform, resolve_data_config

    from tokenbench.data import video as video_data
    from tokenbench.models import video

    if isinstance(model, video.VideoVisionTransformer):
        return video_data.eval_transform(model, protocol)
    if protocol is not None:
        raise BenchError("a video protocol applies to video models only")
    return create_transform(**resolve_data_config({}, model=model))


def load_split(model: torch.nn.Module, dataset: str, split: str, root: str | None = None):
    """Every image of a dataset split through `model`'s eval preprocessing, decoded once: (images, labels)."""
    from tokenbench.data.images import preload

    return preload(build_dataset(dataset, split, eval_transform(model), root).dataset)
