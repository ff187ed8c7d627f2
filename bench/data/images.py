"""Image datasets: builders returning torch datasets of (image tensor, label) (`datasets` names them).

Every dataset is preprocessed with the model's own eval transform (timm's `resolve_data_config` /
`create_transform`), so a user's model gets the preprocessing it was trained with.

The embedded default, `digits`, is scikit-learn's handwritten digits (1,797 real 8x8 scans shipped
inside scikit-learn) split once, stratified and seeded, into train / val / test.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tokenbench.errors import BenchError

SPLITS = ("train", "val", "test")


@dataclass
class DatasetInfo:
    dataset: Dataset
    name: str
    split: str
    num_classes: int
    unreadable: int = 0  # images that could not be decoded and were left out
    missing: int = 0  # listed files that are not there (videos lost to YouTube attrition)
    views: int = 1  # views per item (video clips x crops): items are [views, ...] when more than one
    mirror_invariant: bool = True  # labels survive a horizontal flip (not so for digits), so training may mirror


class ArrayImages(Dataset):
    """In-memory uint8 images [N, H, W] or [N, H, W, 3] with labels, as PIL images through `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def read(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def __getitem__(self, i):
        return self.transform(self.read(i)), int(self.labels[i])


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


def digits(split: str, transform: Callable, root: str | None = None) -> DatasetInfo:
    images, labels = digits_split(split)
    return DatasetInfo(ArrayImages(images, labels, transform), "digits", split, num_classes=10,
                       mirror_invariant=False)


# --- Real datasets -------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish
forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
willow_tree wolf woman worm""".split())  # the official fine-label order (torchvision's meta), alphabetical


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


class Unreadable(Exception):
    """An image file that could not be decoded."""


class ImageFiles(Dataset):
    """Images decoded lazily from files (or members of one zip archive), with their labels.

    `read(i)` gives the RGB PIL image or raises `Unreadable`; `identity` names the exact files for caching.
    """

    def __init__(self, paths: list[str], labels: list[int], transform: Callable, archive: Path | None = None):
        self.paths, self.labels, self.transform, self.archive = paths, np.asarray(labels, dtype=np.int64), transform, archive
        self._zip, self._zip_pid = None, None

    def __len__(self):
        return len(self.paths)

    def read(self, i: int) -> Image.Image:
        try:
            if self.archive is not None:
                import zipfile

                if self._zip is None or self._zip_pid != os.getpid():  # a forked worker opens its own handle
                    self._zip, self._zip_pid = zipfile.ZipFile(self.archive), os.getpid()
                with self._zip.open(self.paths[i]) as f:
                    image = Image.open(io.BytesIO(f.read()))
            else:
                image = Image.open(self.paths[i])
            return image.convert("RGB")
        except Exception as err:  # PIL raises many types for truncated or foreign files
            raise Unreadable(f"{self.paths[i]}: {err}") from None

    def __getitem__(self, i):
        return self.transform(self.read(i)), int(self.labels[i])

    def __getstate__(self):  # a zip handle does not cross process boundaries
        return {**self.__dict__, "_zip": None, "_zip_pid": None}

    @property
    def identity(self) -> str:
        """What makes these images these images: the archive's or files' paths, sizes and mtimes."""
        digest = hashlib.sha256()
        if self.archive is not None:
            st = self.archive.stat()
            digest.update(f"{self.archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        for path, label in zip(self.paths, self.labels):
            st = None if self.archive is not None else os.stat(path)
            digest.update(f"{path}|{label}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def decode_all(files: ImageFiles, transform: Callable) -> tuple[ArrayImages, int]:
    """Decode every image once into memory (small images: CIFAR), counting and skipping unreadable ones."""
    images, labels, unreadable = [], [], 0
    for i in range(len(files)):
        try:
            images.append(np.asarray(files.read(i)))
        except Unreadable:
            unreadable += 1
            continue
        labels.append(files.labels[i])
    if not images:
        raise BenchError("no readable images found")
    return ArrayImages(np.stack(images), np.asarray(labels), transform), unreadable


def no_images(name: str, folder: Path) -> BenchError:
    classes = sum(p.is_dir() for p in folder.iterdir())
    return BenchError(f"dataset {name!r}: no images found under {folder} ({classes} class folders, no file in them "
                      f"ends in {', '.join(IMAGE_SUFFIXES)})")


def missing_root(name: str, root, layout: str) -> BenchError:
    where = f"--data-root {root}" if root else "no --data-root given"
    return BenchError(f"dataset {name!r}: {where} does not hold the expected layout:\n{layout}")


def class_folder_items(folder: Path, class_index: dict[str, int], dataset: str) -> tuple[list[str], list[int]]:
    """(paths, labels) of `folder/<class>/<image>`, labelled by a fixed class index."""
    paths, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name not in class_index:
            raise BenchError(f"dataset {dataset!r}: folder {class_dir} is not one of its classes")
        for f in sorted(class_dir.iterdir()):
            if is_image(f.name):
                paths.append(str(f))
                labels.append(class_index[class_dir.name])
    return paths, labels


def holdout_split(labels: np.ndarray, split: str, val_fraction: float = 0.1) -> np.ndarray:
    """Indices of train/val carved from a dataset's official train split (stratified, seed 0)."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=0)
    return np.sort({"train": train, "val": val}[split])


CIFAR_LAYOUT = """  ROOT/train.zip, ROOT/test.zip     zips of train/<class>/<image> and test/<class>/<image>
  ROOT/train/<class>/<image>, ROOT/test/<class>/<image>   the same as folders
  ROOT/{tv_folder}/                torchvision's format (downloaded there if the machine is online)
val is a stratified 10% of the official train split (seed 0); train is the other 90%; test is the official test set."""


def cifar(name: str, classes: tuple[str, ...], tv_class, split: str, transform: Callable, root: str | None,
          download: bool = False) -> DatasetInfo:
    layout = CIFAR_LAYOUT.format(tv_folder=tv_class.base_folder)
    if root is None or not Path(root).is_dir():
        raise missing_root(name, root, layout)
    root_path, official = Path(root), "test" if split == "test" else "train"
    index = {c: i for i, c in enumerate(classes)}
    unreadable = 0
    if (root_path / f"{official}.zip").is_file() or (root_path / official).is_dir():
        archive = root_path / f"{official}.zip"
        if archive.is_file():
            import zipfile

            try:
                with zipfile.ZipFile(archive) as z:
                    members = sorted(m for m in z.namelist() if is_image(m))
            except (zipfile.BadZipFile, OSError) as err:
                raise BenchError(f"{name}: {archive} is not a readable zip file ({err}); download it again") from None
            paths, labels = [], []
            for m in members:
                parts = m.split("/")
                if len(parts) < 2 or parts[-2] not in index:
                    raise BenchError(f"dataset {name!r}: {archive} member {m} is not in a class folder")
                paths.append(m)
                labels.append(index[parts[-2]])
            files = ImageFiles(paths, labels, transform, archive)
        else:
            files = ImageFiles(*class_folder_items(root_path / official, index, name), transform)
        arrays, unreadable = decode_all(files, transform)
        images, labels = arrays.images, arrays.labels
    elif (root_path / tv_class.base_folder).is_dir() or download:
        try:
            tv = tv_class(str(root_path), train=official == "train", download=download)
        except RuntimeError as err:
            raise BenchError(f"dataset {name!r}: {err}") from None
        images, labels = tv.data, np.asarray(tv.targets)
    else:
        raise missing_root(name, root, layout)
    if split != "test":
        chosen = holdout_split(labels, split)
        images, labels = images[chosen], labels[chosen]
    return DatasetInfo(ArrayImages(images, labels, transform), name, split, len(classes), unreadable)


def cifar10(split: str, transform: Callable, root: str | None = None, **options) -> DatasetInfo:
    from torchvision.datasets import CIFAR10

    return cifar("cifar10", CIFAR10_CLASSES, CIFAR10, split, transform, root, **options)


def cifar100(split: str, transform: Callable, root: str | None = None, **options) -> DatasetInfo:
    from torchvision.datasets import CIFAR100

    return cifar("cifar100", CIFAR100_CLASSES, CIFAR100, split, transform, root, **options)


IMAGENET_LAYOUT = """  ROOT/val/<wnid>/<image>.JPEG   the usual validation layout (any subset of the 1,000 classes)
  ROOT/val/<image>.JPEG and a label file ROOT/<name>.txt with lines '<image> <class index or wnid>'
  (ROOT/synset_words.txt, if present, gives the class order; otherwise the canonical sorted wnids)
split test and val both read ROOT/val (ImageNet's labelled held-out set); train reads ROOT/train."""


def imagenet_wnids(root: Path) -> list[str]:
    """The canonical 1,000-class order: ROOT/synset_words.txt if present, else timm's sorted wnids."""
    synsets = root / "synset_words.txt"
    if synsets.is_file():
        wnids = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
    else:
        from timm.data import ImageNetInfo

        wnids = list(ImageNetInfo().label_names())
    if len(wnids) != 1000 or len(set(wnids)) != 1000:
        raise BenchError(f"imagenet class list has {len(wnids)} entries, expected 1,000 distinct wnids")
    return wnids


def read_label_file(path: Path, wnid_index: dict[str, int]) -> dict[str, int]:
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) != 2:
            raise BenchError(f"{path}:{n}: expected '<image> <class index or wnid>', got {line!r}")
        name, label = parts
        if label in wnid_index:
            labels[name] = wnid_index[label]
        elif label.isdigit() and int(label) < len(wnid_index):
            labels[name] = int(label)
        else:
            raise BenchError(f"{path}:{n}: {label!r} is neither a class index below 1000 nor a known wnid")
    return labels


def label_file(root: Path) -> Path | None:
    """A flat layout's label file: a .txt in ROOT with 'label' in its name, or ROOT/val.txt."""
    found = sorted(p for p in root.glob("*.txt") if "label" in p.name.lower()) or [p for p in [root / "val.txt"] if p.is_file()]
    return found[0] if found else None


def imagenet(split: str, transform: Callable, root: str | None = None) -> DatasetInfo:
    if root is None or not Path(root).is_dir():
        raise missing_root("imagenet", root, IMAGENET_LAYOUT)
    root_path = Path(root)
    folder = root_path / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise missing_root("imagenet", root, IMAGENET_LAYOUT)
    wnids = imagenet_wnids(root_path)
    index = {w: i for i, w in enumerate(wnids)}
    if any(p.is_dir() for p in folder.iterdir()):
        paths, labels = class_folder_items(folder, index, "imagenet")
    else:
        labels_path = label_file(root_path)
        if labels_path is None:
            raise missing_root("imagenet", root, IMAGENET_LAYOUT)
        known = read_label_file(labels_path, index)
        images = sorted(p for p in folder.iterdir() if is_image(p.name))
        unlabelled = [p.name for p in images if p.name not in known]
        if unlabelled:
            raise BenchError(f"imagenet: {len(unlabelled)} images in {folder} have no label in {labels_path} "
                             f"(e.g. {unlabelled[0]})")
        paths, labels = [str(p) for p in images], [known[p.name] for p in images]
    if not paths:
        raise no_images("imagenet", folder)
    return DatasetInfo(ImageFiles(paths, labels, transform), "imagenet", split, 1000)


FOLDER_LAYOUT = """  ROOT/<split>/<class>/<image>   with split one of train, val, test
  ROOT/<class>/<image>           one set of images used for any split
classes are numbered in sorted folder-name order."""


def folder(split: str, transform: Callable, root: str | None = None) -> DatasetInfo:
    """A user's own images, one folder per class."""
    if root is None or not Path(root).is_dir():
        raise missing_root("folder", root, FOLDER_LAYOUT)
    root_path = Path(root)
    has_splits = any((root_path / s).is_dir() for s in SPLITS)
    base = root_path / split if has_splits else root_path
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not classes:
        raise missing_root("folder", root, FOLDER_LAYOUT)
    paths, labels = class_folder_items(base, {c: i for i, c in enumerate(classes)}, "folder")
    if not paths:
        raise no_images("folder", base)
    return DatasetInfo(ImageFiles(paths, labels, transform), "folder", split, len(classes))


def preload(dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and preprocess every image of a torch dataset once, as (images, labels) tensors."""
    images, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=0):
        images.append(x)
        labels.append(y)
    if not images:
        raise BenchError("the dataset has no images")
    return torch.cat(images), torch.cat(labels)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """(images, labels) in consecutive batches of `batch_size`."""
    for i in range(0, len(labels), batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]
