"""The decode-once image store: exact pixels, reuse across runs, invalidation, unreadable images."""

import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from tokenbench.data import images as data
from tokenbench.data import registry as datasets
from tokenbench.data import store as cache
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


def only_store(root):
    (store,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return store


@pytest.mark.parametrize("damage", ["flip image bytes", "zero labels", "truncate images", "bad header",
                                    "bad meta", "no labels", "changed n"])
def test_a_damaged_store_is_detected_reported_and_rebuilt(image_folder, tmp_path, capsys, damage):
    transform = imagenet_style()
    ds = datasets.build_dataset("folder", "test", transform, str(image_folder))
    expected = cache.load_images(ds, transform, tmp_path / "store").batch(0, 6)
    store = only_store(tmp_path / "store")
    images, labels, meta = store / "images.npy", store / "labels.npy", store / "meta.json"
    if damage == "flip image bytes":
        raw = bytearray(images.read_bytes())
        raw[-100:] = bytes(255 - b for b in raw[-100:])
        images.write_bytes(bytes(raw))
    elif damage == "zero labels":
        np.save(labels, np.zeros(6, dtype=np.int64))
    elif damage == "truncate images":
        images.write_bytes(images.read_bytes()[:500])
    elif damage == "bad header":
        images.write_bytes(b"garbage" + images.read_bytes()[7:])
    elif damage == "bad meta":
        meta.write_text("{not json")
    elif damage == "no labels":
        labels.unlink()
    else:
        meta.write_text(meta.read_text().replace('"n": 6', '"n": 4'))
    capsys.readouterr()
    again = cache.load_images(ds, transform, tmp_path / "store")
    assert f"the image store {store} is damaged" in capsys.readouterr().err and not again.cached
    x, y = again.batch(0, 6)
    assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    assert cache.load_images(ds, transform, tmp_path / "store").cached  # whole again


def test_a_full_cache_disk_is_one_clear_error_and_leaves_nothing(image_folder, tmp_path, monkeypatch):
    transform = imagenet_style()
    ds = datasets.build_dataset("folder", "test", transform, str(image_folder))
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(BenchError, match=r"the image store needs 0 MB and .* has 0 MB free: free some space or "
                                         r"pass --cache-dir"):
        cache.load_images(ds, transform, tmp_path / "store")
    assert not any((tmp_path / "store").iterdir())


def test_temporary_stores_of_killed_runs_are_removed_at_the_next_start(image_folder, tmp_path):
    transform = imagenet_style()
    ds = datasets.build_dataset("folder", "test", transform, str(image_folder))
    root = tmp_path / "store"
    dead = subprocess_pid_that_exited()
    stale = root / f".folder-test-abc-pid{dead}-x1y2"
    alive = root / f".folder-test-abc-pid{os.getpid()}-x1y2"  # a store this process is writing
    stale.mkdir(parents=True)
    alive.mkdir()
    cache.load_images(ds, transform, root)
    assert not stale.exists() and alive.exists()


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_decoding_workers_die_with_a_killed_parent(tmp_path):
    """A SIGKILLed run leaves no decoding worker behind (the kernel kills them with it)."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time, torch\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "from tokenbench.data.store import die_with_parent\n"
        "class Slow(Dataset):\n"
        "    def __len__(self): return 1000\n"
        "    def __getitem__(self, i):\n"
        "        os.write(1, f'worker {os.getpid()}\\n'.encode()); time.sleep(60); return i\n"
        "for _ in DataLoader(Slow(), num_workers=2, worker_init_fn=die_with_parent): pass\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [parent.stdout.readline() for _ in range(2)]  # one write(2) a line: two workers never interleave
    if not all(line.startswith("worker ") for line in lines):  # say why, not an IndexError
        parent.kill()
        _, err = parent.communicate()
        pytest.fail(f"the parent did not start two workers (exit {parent.returncode}, lines {lines}): {err[-3000:]}")
    workers = {int(line.split()[1]) for line in lines}
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") and "Z" not in status(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") and "Z" not in status(pid) for pid in workers)


def status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0]
    except OSError:
        return "Z"
