"""Real datasets: ImageNet (folder and flat layouts, canonical labels), CIFAR-10/100, users' image folders."""

import io
import zipfile

import numpy as np
import pytest
import timm
import torch
from conftest import shared_data
from PIL import Image

from tokenbench.cli import main
from tokenbench.data import images as data
from tokenbench.data import registry as datasets
from tokenbench.errors import BenchError
from tokenbench.measure.results import read_results
from tokenbench.models.loading import save_checkpoint


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_CACHE", str(tmp_path / "cache"))


def identity(image):
    return image


def caffe_labels(root):
    lines = (root / "ILSVRC2012_val_labels_50k_caffe_val.txt").read_text().split("\n")
    return {name: int(label) for name, label in (line.split() for line in lines if line.strip())}


def test_imagenet_subset_keeps_the_canonical_1000_class_index():
    root = shared_data("imagenet-val")
    ds = datasets.build_dataset("imagenet", "test", identity, str(root))
    files = ds.dataset
    assert ds.num_classes == 1000 and len(files) == 1300 and len(set(files.labels.tolist())) == 725
    official = caffe_labels(root)  # the published val labels, indexed by sorted wnid
    assert all(official[p.rsplit("/", 1)[1]] == label for p, label in zip(files.paths, files.labels))
    assert max(files.labels) > 725  # a plain ImageFolder would have numbered the classes 0..724


def test_imagenet_class_order_falls_back_to_timms_sorted_wnids(tmp_path):
    root = shared_data("imagenet-val")
    wnids = data.imagenet_wnids(tmp_path)  # no synset_words.txt there
    assert wnids == [line.split()[0] for line in (root / "synset_words.txt").read_text().splitlines()]


def test_imagenet_flat_layout_with_a_label_file(tmp_path):
    root = shared_data("imagenet-val")
    folder_ds = datasets.build_dataset("imagenet", "val", identity, str(root)).dataset
    chosen = folder_ds.paths[::260]
    (tmp_path / "val").mkdir()
    for path in chosen:
        (tmp_path / "val" / path.rsplit("/", 1)[1]).symlink_to(path)
    official = caffe_labels(root)
    wnids = data.imagenet_wnids(root)
    # one line by index, the others by wnid: both forms are accepted
    lines = [f"{p.rsplit('/', 1)[1]} {official[p.rsplit('/', 1)[1]] if i == 0 else wnids[official[p.rsplit('/', 1)[1]]]}"
             for i, p in enumerate(chosen)]
    (tmp_path / "val_labels.txt").write_text("\n".join(lines) + "\n")
    flat = datasets.build_dataset("imagenet", "test", identity, str(tmp_path)).dataset
    assert sorted(flat.labels.tolist()) == sorted(folder_ds.labels[::260].tolist())
    assert flat.read(0).size == folder_ds.read(0).size


def test_imagenet_missing_root_shows_the_expected_layout(tmp_path):
    with pytest.raises(BenchError, match=r"(?s)does not hold the expected layout.*ROOT/val/<wnid>/<image>.JPEG"):
        datasets.build_dataset("imagenet", "test", identity, str(tmp_path / "absent"))
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.JPEG").write_bytes(b"")
    with pytest.raises(BenchError, match="label file"):
        datasets.build_dataset("imagenet", "test", identity, str(tmp_path))


def test_cifar10_test_zip_is_read_in_place_with_official_labels():
    root = shared_data("cifar10")
    ds = datasets.build_dataset("cifar10", "test", identity, str(root))
    images = ds.dataset
    assert ds.num_classes == 10 and ds.unreadable == 0
    assert images.images.shape == (10000, 32, 32, 3) and np.bincount(images.labels).tolist() == [1000] * 10
    index = [line.split() for line in (root / "test_index_official_order.txt").read_text().splitlines()[1:]]
    official = {cls: int(label) for _, label, cls, _ in index}  # the label of each class in the official batches
    assert official == {cls: i for i, cls in enumerate(data.CIFAR10_CLASSES)}


def png(rgb, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_cifar100_folder_layout_uses_the_official_fine_label_order(tmp_path):
    assert len(data.CIFAR100_CLASSES) == 100 == len(set(data.CIFAR100_CLASSES))
    assert list(data.CIFAR100_CLASSES) == sorted(data.CIFAR100_CLASSES)
    for split in ("train", "test"):
        for cls in ("apple", "worm"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(10):
                (tmp_path / split / cls / f"{i}.png").write_bytes(png((i, 0, 0)))
    test = datasets.build_dataset("cifar100", "test", identity, str(tmp_path))
    assert test.num_classes == 100 and sorted(set(test.dataset.labels.tolist())) == [0, 99]
    train = datasets.build_dataset("cifar100", "train", identity, str(tmp_path)).dataset
    val = datasets.build_dataset("cifar100", "val", identity, str(tmp_path)).dataset
    assert len(train) == 18 and len(val) == 2 and sorted(val.labels.tolist()) == [0, 99]  # 10% held out, stratified


def test_cifar10_zip_counts_unreadable_images(tmp_path):
    with zipfile.ZipFile(tmp_path / "test.zip", "w") as z:
        z.writestr("test/cat/0.png", png((1, 2, 3)))
        z.writestr("test/dog/1.png", b"not an image")
    ds = datasets.build_dataset("cifar10", "test", identity, str(tmp_path))
    assert len(ds.dataset) == 1 and ds.unreadable == 1 and ds.dataset.labels.tolist() == [3]
    with pytest.raises(BenchError, match="ROOT/train.zip"):
        datasets.build_dataset("cifar10", "test", identity, str(tmp_path / "nowhere"))


def test_folder_dataset_with_and_without_split_folders(tmp_path):
    for cls in ("b_cat", "a_dog"):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        (tmp_path / "flat" / cls / "x.png").write_bytes(png((5, 5, 5)))
    ds = datasets.build_dataset("folder", "test", identity, str(tmp_path / "flat"))
    assert ds.num_classes == 2 and ds.dataset.labels.tolist() == [0, 1]  # sorted folder names: a_dog = 0
    (tmp_path / "split" / "val" / "x").mkdir(parents=True)
    with pytest.raises(BenchError, match="ROOT/<split>/<class>/<image>"):
        datasets.build_dataset("folder", "test", identity, str(tmp_path / "split"))


@pytest.fixture
def imagenet_sample(tmp_path):
    """31 real ImageNet val images (every 43rd) in the usual layout (symlinks), with the class list."""
    root = shared_data("imagenet-val")
    files = datasets.build_dataset("imagenet", "test", identity, str(root)).dataset
    sample = tmp_path / "imagenet"
    for path in files.paths[::43]:
        wnid, name = path.rsplit("/", 2)[1:]
        (sample / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (sample / "val" / wnid / name).symlink_to(path)
    (sample / "synset_words.txt").symlink_to(root / "synset_words.txt")
    return sample


def test_imagenet_from_the_cli_with_the_models_own_transform(tmp_path, imagenet_sample):
    torch.manual_seed(0)
    checkpoint = tmp_path / "in1k.pt"
    save_checkpoint(checkpoint, timm.create_model("vit_cifar10", num_classes=1000), "vit_cifar10", {})
    # one unreadable image: counted in the row, or the run fails under --strict
    (imagenet_sample / "val" / "n01440764" / "broken.JPEG").write_bytes(b"\xff\xd8 truncated")
    args = ["bench", "--method", "none", "--checkpoint", str(checkpoint), "--dataset", "imagenet",
            "--data-root", str(imagenet_sample), "--out", str(tmp_path / "out"), "--no-timing"]
    assert main(args + ["--strict"]) == 2
    assert main(args) == 0
    row = read_results(tmp_path / "out" / "results.jsonl")[0]
    assert row.n_images == 31 and row.n_unreadable == 1 and row.dataset == "imagenet"
    assert row.weights.startswith("file:in1k.pt@sha256:")


def test_pretrained_tag_loads_offline_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """timm name.tag + --pretrained reads the HF cache with HF_HUB_OFFLINE=1; the row names the snapshot."""
    from safetensors.torch import save_file

    from tokenbench.models.loading import load_model

    torch.manual_seed(3)
    weights = {k: v.contiguous() for k, v in timm.create_model("test_vit.r160_in1k").state_dict().items()}
    repo = tmp_path / "hub" / "models--timm--test_vit.r160_in1k"
    (repo / "snapshots" / ("ab" * 20)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    save_file(weights, repo / "snapshots" / ("ab" * 20) / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("test_vit.r160_in1k", pretrained=True)
    assert loaded.weights == "timm:timm/test_vit.r160_in1k@" + "ab" * 6
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(BenchError, match="offline"):
        load_model("test_vit.r160_in1k.nonexistent_tag", pretrained=True)


@pytest.mark.slow
def test_the_imagenet_val_board_runs_end_to_end_on_random_weights(tmp_path, imagenet_sample):
    """The documented ImageNet-val board (docs/datasets-and-scale.md), on a random-init DeiT-Tiny for its
    plumbing: 31 real images keep their canonical 1,000-class labels, every method's row is written, and the
    board is built and names the weights as random."""
    out = tmp_path / "imagenet-val"
    args = ["bench", "--method", "none,topk,random,tome", "--model", "deit_tiny_patch16_224", "--dataset",
            "imagenet", "--data-root", str(imagenet_sample), "--split", "val", "--out", str(out), "--no-timing"]
    assert main(args) == 0
    rows = read_results(out / "results.jsonl")
    assert sorted({r.method for r in rows}) == ["none", "random", "tome", "topk"]
    assert {(r.n_images, r.dataset, r.split) for r in rows} == {(31, "imagenet", "val")}
    assert all(r.weights.startswith("random-init") for r in rows), rows[0].weights
    assert main(["leaderboard", "--results", str(out)]) == 0
    board = (out / "leaderboard.md").read_text()
    assert "imagenet · deit_tiny_patch16_224" in board and "| tome " in board
