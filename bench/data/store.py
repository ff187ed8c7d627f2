"""Decode once, sweep many: a store of preprocessed uint8 images shared by every configuration of a sweep.

A timm eval transform is `Resize -> CenterCrop -> ToTensor -> Normalize`. The part before `ToTensor` is
applied once per image and kept as uint8 `[N, 3, H, W]` in a memory-mapped `.npy`, keyed by the dataset's
identity (its files, sizes and mtimes), the split and that part of the transform; the float conversion and
normalisation run once per sweep (kept in memory up to 2 GiB, else per batch). A second sweep (or a second
process of a data-parallel run) reads the same store instead of decoding JPEGs again.

Transforms of another shape (video views) are kept as floats when they fit in those 2 GiB; a bigger set
(Kinetics-400 val is terabytes of views) is streamed: decoded again, by worker processes, at every pass.

A store carries the SHA-256 of its files, checked each time it is opened (about 1 s per GB): a damaged
store is reported and rebuilt, never read. Its space is reserved before decoding (a full disk is one line,
not a SIGBUS), the temporary folders of killed runs are removed at the next start, and decoding workers
die with the process that started them.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.dataloader import default_collate
from torchvision import transforms

from tokenbench.data.images import DatasetInfo, Unreadable
from tokenbench.errors import BenchError

FORMAT_VERSION = 2  # 2: checksummed
FLOAT_MEMORY_BYTES = 2 << 30  # a sweep's normalised images up to this size are made once, not per configuration


def cache_root() -> Path:
    """tokenbench's cache folder: `TOKENBENCH_CACHE`, else the user cache folder (XDG on Linux)."""
    if os.environ.get("TOKENBENCH_CACHE"):
        return Path(os.environ["TOKENBENCH_CACHE"])
    try:
        import platformdirs
    except ImportError:  # a machine with only the core stack installed (--no-deps): the XDG default
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenbench"
    return Path(platformdirs.user_cache_dir("tokenbench"))


def default_cache_dir() -> Path:
    return cache_root() / "images"


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


class Readable(Dataset):
    """`dataset`'s items, None for one that cannot be decoded (a video that broke after its readability check)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except Unreadable:
            return None


def collate_readable(items) -> tuple:
    """(images, labels, how many items were unreadable); images and labels None when none was readable."""
    kept = [item for item in items if item is not None]
    images, labels = default_collate(kept) if kept else (None, None)
    return images, labels, len(items) - len(kept)


def worker_context(dataset):
    """The start method of `dataset`'s worker processes: a forkserver where the dataset says that a forked copy
    of this process cannot read it (`fork_safe = False`: PyAV 18.1.1 hangs in a child forked after the parent
    decoded a video), else the platform's default."""
    while isinstance(dataset, (Subset, Readable)):
        dataset = dataset.dataset
    if getattr(dataset, "fork_safe", True):
        return None
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([type(dataset).__module__])  # each pass's workers start without re-importing
    return context


def readable_batches(dataset, batch_size: int, workers: int, strict: bool, unreadable: list):
    """Batches of the readable items of `dataset`; the unreadable ones are added to `unreadable[0]` (or, under
    strict, fail the run)."""
    loader = DataLoader(Readable(dataset), batch_size=batch_size, num_workers=workers, collate_fn=collate_readable,
                        worker_init_fn=die_with_parent if workers else None,
                        multiprocessing_context=worker_context(dataset) if workers else None)
    for images, labels, dropped in loader:
        if dropped and strict:
            raise BenchError(f"{dropped} unreadable items (drop --strict to count and skip them)")
        unreadable[0] += dropped
        if images is not None:
            yield images, labels


@dataclass
class StreamedStore:
    """A set too big to keep: every `batches` pass decodes and preprocesses it again in `workers` processes.

    Items that turn out unreadable are skipped and counted once (every pass skips the same ones).
    """

    dataset: Dataset
    unreadable: int
    workers: int
    strict: bool = False
    cached: bool = False
    _counted: bool = field(default=False, repr=False)

    def __len__(self):
        return len(self.dataset)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next(readable_batches(Subset(self.dataset, range(start, stop)), stop - start, 0, self.strict, [0]))

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        stop = len(self) if stop is None else stop
        dropped = [0]
        yield from readable_batches(Subset(self.dataset, range(start, stop)), batch_size, self.workers, self.strict,
                                    dropped)
        if not self._counted:
            self.unreadable += dropped[0]
            self._counted = True


def die_with_parent(worker_id: int = 0) -> None:
    """A DataLoader worker's init: on Linux, the kernel kills it when the process that started it dies
    (a SIGKILLed sweep leaves no worker behind)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above ran
            os._exit(1)


def reserve(path: Path, size: int) -> None:
    """Allocate `size` bytes of `path` on disk now, so that a full disk is an error here, not a SIGBUS later."""
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise BenchError(f"the image store needs {size / 2**20:.0f} MB and {path.parent} has {free / 2**20:.0f} MB "
                         "free: free some space or pass --cache-dir")
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as err:
        raise BenchError(f"cannot reserve {size / 2**20:.0f} MB for the image store in {path.parent}: "
                         f"{err.strerror or err}; free some space or pass --cache-dir") from None


def checksums(store: Path) -> dict[str, str]:
    """SHA-256 of the store's data files."""
    out = {}
    for name in ("images.npy", "labels.npy"):
        with open(store / name, "rb") as f:
            out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def damage(store: Path) -> str | None:
    """Why the store at `store` cannot be trusted, or None when it is whole and its checksums match."""
    try:
        meta = json.loads((store / "meta.json").read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict) or not isinstance(meta.get("n"), int):
            return "meta.json lacks its fields"
        if checksums(store) != meta["sha256"]:
            return "its files do not match their checksums"
        images = np.load(store / "images.npy", mmap_mode="r")
        if len(np.load(store / "labels.npy")) != meta["n"] or images.shape[0] < meta["n"]:
            return "its image and label counts disagree"
    except (OSError, ValueError) as err:  # a missing file, bad JSON, a bad .npy header
        return f"{type(err).__name__}: {err}"
    return None


def remove_stale_temporaries(parent: Path) -> None:
    """Remove the temporary stores of runs that were killed while decoding (their pid is gone)."""
    for work in parent.glob(".*-pid*-*"):
        try:
            pid = int(work.name.rsplit("-pid", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


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
    loader = DataLoader(Preprocessing(dataset, steps), batch_size=None, num_workers=workers, collate_fn=as_is,
                        worker_init_fn=die_with_parent if workers else None)
    for i, pixels, why in loader:
        if pixels is None:
            if strict:
                raise BenchError(f"unreadable image {why} (drop --strict to count and skip it)")
            unreadable += 1
            continue
        pixels = pixels.transpose(2, 0, 1) if pixels.dtype == np.uint8 else pixels
        if images is None:
            shape = (len(dataset), *pixels.shape)
            if out_dir is None:
                images = np.empty(shape, pixels.dtype)
            else:
                images = np.lib.format.open_memmap(out_dir / "images.npy", "w+", pixels.dtype, shape)
                reserve(out_dir / "images.npy", (out_dir / "images.npy").stat().st_size)
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
        readable = Readable(ds.dataset)
        first = next((item[0] for item in (readable[i] for i in range(len(readable))) if item is not None), None)
        if first is None:
            raise BenchError(f"no readable items in {ds.name}/{ds.split}")
        if len(ds.dataset) * first.numel() * first.element_size() > FLOAT_MEMORY_BYTES:
            return StreamedStore(ds.dataset, ds.unreadable, workers, strict)
        images, labels, dropped = [], [], [0]
        for x, y in readable_batches(ds.dataset, 256, 0, strict, dropped):
            images.append(x)
            labels.append(y)
        if not images:
            raise BenchError(f"no readable items in {ds.name}/{ds.split}")
        return ImageStore(torch.cat(images).numpy(), torch.cat(labels).numpy(), None, None,
                          ds.unreadable + dropped[0], False)
    steps, mean, std = split
    key = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, "dataset": ds.name, "split": ds.split,
                                     "identity": dataset_identity(ds.dataset), "steps": repr(steps)},
                                    sort_keys=True).encode()).hexdigest()[:24]
    store = Path(cache_dir or default_cache_dir()) / f"{ds.name}-{ds.split}-{key}"
    store.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(store.parent)
    cached = store.is_dir()
    why = damage(store) if cached else None
    if why is not None:
        print(f"tokenbench: warning: the image store {store} is damaged ({why}); rebuilding it", file=sys.stderr)
        shutil.rmtree(store, ignore_errors=True)
        cached = False
    if not cached:
        work = Path(tempfile.mkdtemp(prefix=f".{store.name}-pid{os.getpid()}-", dir=store.parent))
        try:
            images, labels, unreadable, n = decode(ds, steps, strict, work, workers)
            images.flush()
            del images
            np.save(work / "labels.npy", labels)
            meta = {"n": n, "unreadable": unreadable, "dataset": ds.name, "split": ds.split, "steps": repr(steps),
                    "sha256": checksums(work)}
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
