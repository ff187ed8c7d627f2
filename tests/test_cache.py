"""The decode-once image store: exact pixels, reuse across runs, invalidation, unreadable images."""

import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from tokenbench import cache, data, datasets
from tokenbench.errors import BenchError


@pytest.fixture
def image_folder(tmp_path):
    """Six real-looking photos of two sizes (noise, so resizing and cropping matter) in two classes."""
    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "images"
    for i in range(6):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        size = (40, 30) if i < 3 else (30, 50)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def imagenet_style(size=24, crop_pct=0.875):
    return create_transform(input_size=(3, size, size), interpolation="bicubic", crop_pct=crop_pct,
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_store_gives_exactly_the_transformed_images_and_is_reused(image_folder, tmp_path):
    transform = imagenet_style()
    ds = datasets.build_dataset("folder", "test", transform, str(image_folder))
    first = cache.load_images(ds, transform, tmp_path / "store")
    assert not first.cached and first.images.dtype.name == "uint8" and first.images.shape == (6, 3, 24, 24)
    x, y = first.batch(0, 6)
    expected = torch.stack([ds.dataset[i][0] for i in range(6)])
    assert torch.equal(x, expected) and y.tolist() == ds.dataset.labels.tolist()
    again = cache.load_images(ds, transform, tmp_path / "store")
    assert again.cached and torch.equal(torch.cat([b for b, _ in again.batches(4)]), expected)
    assert [len(b) for b, _ in again.batches(4, start=1, stop=6)] == [4, 1]


def test_store_is_keyed_by_transform_and_by_the_files(image_folder, tmp_path):
    store = tmp_path / "store"
    ds = datasets.build_dataset("folder", "test", imagenet_style(), str(image_folder))
    cache.load_images(ds, imagenet_style(), store)
    assert not cache.load_images(ds, imagenet_style(crop_pct=1.0), store).cached
    assert len(list(store.iterdir())) == 2
    path = image_folder / "dog" / "0.jpg"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(path)
    os.utime(path, ns=(1, 1))
    changed = datasets.build_dataset("folder", "test", imagenet_style(), str(image_folder))
    fresh = cache.load_images(changed, imagenet_style(), store)
    assert not fresh.cached and torch.equal(fresh.batch(0, 6)[0], torch.stack([changed.dataset[i][0] for i in range(6)]))


def test_unreadable_images_are_counted_or_fail_under_strict(image_folder, tmp_path):
    (image_folder / "cat" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    transform = imagenet_style()
    ds = datasets.build_dataset("folder", "test", transform, str(image_folder))
    with pytest.raises(BenchError, match="zz_broken.jpg"):
        cache.load_images(ds, transform, tmp_path / "store", strict=True)
    assert not any((tmp_path / "store").iterdir())  # nothing half-written is left behind
    store = cache.load_images(ds, transform, tmp_path / "store")
    assert len(store) == 6 and store.unreadable == 1
    with pytest.raises(BenchError, match="1 unreadable"):
        cache.load_images(ds, transform, tmp_path / "store", strict=True)


def test_other_transforms_fall_back_to_float_tensors_in_memory(image_folder, tmp_path):
    def transform(image):
        return torch.zeros(3, 8, 8) + image.size[0]
    ds = datasets.build_dataset("folder", "test", transform, str(image_folder))
    store = cache.load_images(ds, transform, tmp_path / "store")
    assert not store.cached and store.batch(0, 6)[0][:, 0, 0, 0].tolist() == [40, 30, 30, 40, 40, 30]
    assert not (tmp_path / "store").exists()


def test_batches_kept_in_memory_equal_batches_made_per_step(image_folder, tmp_path, monkeypatch):
    transform = imagenet_style()
    store = cache.load_images(datasets.build_dataset("folder", "test", transform, str(image_folder)), transform,
                              tmp_path / "store")
    kept = [torch.cat(t) for t in zip(*store.batches(4, 1, 6))]
    monkeypatch.setattr(cache, "FLOAT_MEMORY_BYTES", 0)
    stepped = [torch.cat(t) for t in zip(*store.batches(4, 1, 6))]
    assert all(torch.equal(a, b) for a, b in zip(kept, stepped)) and len(kept[1]) == 5


@pytest.mark.parametrize("archive", [False, True], ids=["files", "zip"])
def test_decoding_in_worker_processes_gives_the_same_store(image_folder, tmp_path, archive):
    (image_folder / "cat" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    transform = imagenet_style()
    ds = datasets.build_dataset("folder", "test", transform, str(image_folder))
    if archive:  # members of one zip, as CIFAR's train.zip is read: each worker needs its own handle
        zipped = tmp_path / "images.zip"
        with zipfile.ZipFile(zipped, "w") as z:
            for path in ds.dataset.paths:
                z.write(path, arcname=os.path.relpath(path, image_folder))
        members = [os.path.relpath(p, image_folder) for p in ds.dataset.paths]
        ds.dataset = data.ImageFiles(members, ds.dataset.labels, transform, archive=zipped)
        ds.dataset.read(0)  # the parent process has a handle open before the workers fork
    here = cache.load_images(ds, transform, tmp_path / "here", workers=0)
    spread = cache.load_images(ds, transform, tmp_path / "spread", workers=2)
    assert (len(here), here.unreadable) == (len(spread), spread.unreadable) == (6, 1)
    assert np.array_equal(here.images, spread.images) and np.array_equal(here.labels, spread.labels)
