"""Decode once, sweep many: a store of preprocessed uint8 images shared by every configuration of a sweep.

A timm eval transform is `Resize -> CenterCrop -> ToTensor -> Normalize`. The part before `ToTensor` is
applied once per image and kept as uint8 `[N, 3, H, W]` in a memory-mapped `.npy`, keyed by the dataset's
identity (its files, sizes and mtimes), the split and that part of the transform; the float conversion and
normalisation run once per sweep (kept in memory up to 2 GiB, else per batch). A second sweep (or a second
process of a data-parallel run) reads the same store instead of decoding JPEGs again.

Transforms of another shape (video views) are kept as floats when they fit in those 2 GiB; a bigger set
(Kinetics-400 val is terabytes of views) is streamed: decoded again, by worker processes, at every pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.dataloader import default_collate
from torchvision import transforms

from tokenbench.data import DatasetInfo, Unreadable
from tokenbench.errors import BenchError

FORMAT_VERSION = 1
FLOAT_MEMORY_BYTES = 2 << 30  # a sweep's normalised images up to this size are made once, not per configuration


def default_cache_dir() -> Path:
    return Path(os.environ.get("TOKENBENCH_CACHE", Path.home() / ".cache" / "tokenbench")) / "images"


def split_transform(transform) -> tuple[transforms.Compose, tuple, tuple] | None:
    """(PIL steps, mean, std) of a `... -> ToTensor -> Normalize` transform; None for any other shape."""
    steps = list(getattr(transform, "transforms", []))
    to_tensor = [i for i, t in enumerate(steps) if type(t).__name__ in ("ToTensor", "MaybeToTensor")]
    if not to_tensor:
        return None
    head, tail = steps[:to_tensor[0]], steps[to_tensor[0] + 1:]
    if len(tail) != 1 or not isinstance(tail[0], transforms.Normalize):
        return None
    return transforms.Compose(head), tuple(map(float, tail[0].mean)), tuple(map(float, tail[0].std))


def dataset_identity(dataset) -> str:
    """The files behind a dataset (or, for in-memory arrays, a hash of the pixels and labels)."""
    if hasattr(dataset, "identity"):
        return dataset.identity
    digest = hashlib.sha256(np.ascontiguousarray(dataset.images).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels).tobytes())
    return digest.hexdigest()


@dataclass
class ImageStore:
    """Preprocessed images and labels; `batches` gives normalised float tensors ready for the model."""

    images: np.ndarray  # uint8 [N, 3, H, W] (memory-mapped), or float32 when the transform could not be split
    labels: np.ndarray
    mean: tuple | None
    std: tuple | None
    unreadable: int  # images that could not be decoded and were left out
    cached: bool  # read from an existing store rather than decoded now
    _floats: tuple | None = field(default=None, repr=False)  # ((start, stop), normalised images, labels)

    def __len__(self):
        return len(self.labels)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.array(self.images[start:stop]))
        if self.mean is not None:
            x = x.float().div_(255)
            x = x.sub_(torch.tensor(self.mean)[:, None, None]).div_(torch.tensor(self.std)[:, None, None])
        return x, torch.from_numpy(np.array(self.labels[start:stop]))

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        """Images [start, stop) in batches; normalised once and kept when they fit `FLOAT_MEMORY_BYTES`."""
        stop = len(self) if stop is None else stop
        per_image = 4 * int(np.prod(self.images.shape[1:]))
        if self.mean is not None and (stop - start) * per_image <= FLOAT_MEMORY_BYTES:
            if self._floats is None or self._floats[0] != (start, stop):
                self._floats = ((start, stop), self.batch(start, stop))
            x, y = self._floats[1]
            for i in range(0, stop - start, batch_size):
                yield x[i:i + batch_size], y[i:i + batch_size]
            return
        for i in range(start, stop, batch_size):
            yield self.batch(i, min(i + batch_size, stop))


@dataclass
class StreamedStore:
    """A set too big to keep: every `batches` pass decodes and preprocesses it again in `workers` processes."""

    dataset: Dataset
    unreadable: int
    workers: int
    cached: bool = False

    def __len__(self):
        return len(self.dataset)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return default_collate([self.dataset[i] for i in range(start, stop)])

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else stop
        yield from DataLoader(Subset(self.dataset, range(start, stop)), batch_size=batch_size,
                              num_workers=self.workers)


class Preprocessing(Dataset):
    """(index, preprocessed pixels, None) or (index, None, why unreadable) per image: what `decode` spreads
    over worker processes."""

    def __init__(self, dataset, steps):
        self.dataset, self.steps = dataset, steps

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return i, np.asarray(self.steps(self.dataset.read(i))), None
        except Unreadable as err:
            return i, None, str(err)


def as_is(item):
    return item


def decode(ds: DatasetInfo, steps, strict: bool, out_dir: Path | None = None, workers: int = 0):
    """Apply `steps` to every image once, in `workers` processes (0: this one), keeping the dataset's order;
    unreadable images are counted (or fail the run under strict)."""
    dataset, kept, unreadable, images = ds.dataset, [], 0, None
    loader = DataLoader(Preprocessing(dataset, steps), batch_size=None, num_workers=workers, collate_fn=as_is)
    for i, pixels, why in loader:
        if pixels is None:
            if strict:
                raise BenchError(f"unreadable image {why} (drop --strict to count and skip it)")
            unreadable += 1
            continue
        pixels = pixels.transpose(2, 0, 1) if pixels.dtype == np.uint8 else pixels
        if images is None:
            shape = (len(dataset), *pixels.shape)
            images = (np.lib.format.open_memmap(out_dir / "images.npy", "w+", pixels.dtype, shape)
                      if out_dir is not None else np.empty(shape, pixels.dtype))
        if pixels.shape != images.shape[1:]:
            raise BenchError(f"image {i} of {ds.name} preprocesses to {pixels.shape}, not {images.shape[1:]}: "
                             "the transform does not give one size")
        images[len(kept)] = pixels
        kept.append(i)
    if not kept:
        raise BenchError(f"no readable images in {ds.name}/{ds.split}")
    return images, np.asarray(dataset.labels)[kept], unreadable, len(kept)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def load_images(ds: DatasetInfo, transform, cache_dir: str | Path | None = None, strict: bool = False,
                workers: int | None = None) -> ImageStore | StreamedStore:
    """Every image of `ds` preprocessed once (by `workers` processes), from the store under `cache_dir` when it
    is already there. Video views are kept as floats in memory when they fit `FLOAT_MEMORY_BYTES`, else streamed.
    """
    workers = default_workers() if workers is None else workers
    split = split_transform(transform)
    if split is None or not hasattr(ds.dataset, "read"):
        if not len(ds.dataset):
            raise BenchError(f"no images in {ds.name}/{ds.split}")
        first = ds.dataset[0][0]
        if len(ds.dataset) * first.numel() * first.element_size() > FLOAT_MEMORY_BYTES:
            return StreamedStore(ds.dataset, ds.unreadable, workers)
        images, labels = [], []
        for x, y in DataLoader(ds.dataset, batch_size=256, num_workers=0):
            images.append(x)
            labels.append(y)
        return ImageStore(torch.cat(images).numpy(), torch.cat(labels).numpy(), None, None, ds.unreadable, False)
    steps, mean, std = split
    key = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "dataset": ds.name, "split": ds.split,
                                     "identity": dataset_identity(ds.dataset), "steps": repr(steps)},
                                    sort_keys=True).encode()).hexdigest()[:24]
    store = Path(cache_dir or default_cache_dir()) / f"{ds.name}-{ds.split}-{key}"
    cached = (store / "meta.json").is_file()
    if not cached:
        store.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{store.name}-", dir=store.parent))
        try:
            images, labels, unreadable, n = decode(ds, steps, strict, work, workers)
            images.flush()
            del images
            np.save(work / "labels.npy", labels)
            meta = {"n": n, "unreadable": unreadable, "dataset": ds.name, "split": ds.split, "steps": repr(steps)}
            (work / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                work.rename(store)  # atomic: readers see a whole store or none
            except OSError:  # another process finished the same store first
                shutil.rmtree(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    meta = json.loads((store / "meta.json").read_text())
    if strict and meta["unreadable"]:
        raise BenchError(f"{meta['unreadable']} unreadable images in {ds.name}/{ds.split} "
                         "(drop --strict to count and skip them)")
    images = np.load(store / "images.npy", mmap_mode="r")[:meta["n"]]
    return ImageStore(images, np.load(store / "labels.npy"), mean, std, ds.unreadable + meta["unreadable"], cached)
