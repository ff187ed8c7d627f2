"""The embedded default: shipped weights, the command that made them, and their test accuracy."""

import pytest
import torch
from conftest import shared_data

from tokenbench.data import images as data
from tokenbench.data import registry as datasets
from tokenbench.data.images import batches, preload
from tokenbench.measure.metrics import evaluate
from tokenbench.models.loading import load_model


def test_embedded_weights_reach_their_recorded_test_accuracy():
    loaded = load_model("vit_digits")
    assert loaded.weights.startswith("embedded:vit_digits.pt@sha256:")
    assert loaded.meta["command"].startswith("tokenbench train --model vit_digits --dataset digits")
    test = datasets.build_dataset("digits", "test", datasets.eval_transform(loaded.model))
    images, labels = preload(test.dataset)
    result = evaluate(loaded.model, batches(images, labels, 64), torch.device("cpu"))
    assert result.n_images == 540
    assert result.top1 == pytest.approx(loaded.meta["test_top1"], abs=1 / 540)
    assert result.top1 >= 0.9


def test_digits_splits_are_disjoint_stratified_and_fixed():
    splits = {s: data.digits_split(s) for s in data.SPLITS}
    assert [len(splits[s][1]) for s in data.SPLITS] == [1078, 179, 540]
    seen = set()
    for images, _ in splits.values():
        keys = {im.tobytes() for im in images}
        assert not keys & seen
        seen |= keys
    assert all((splits["test"][1] == c).sum() >= 50 for c in range(10))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_cifar10", "vit_cifar10_v2"])
def test_cifar10_reference_weights_reach_their_recorded_test_accuracy(name):
    root = shared_data("cifar10")
    loaded = load_model(name)
    assert loaded.meta["command"].startswith(f"tokenbench train --model {name} --dataset cifar10")
    test = datasets.build_dataset("cifar10", "test", datasets.eval_transform(loaded.model), str(root))
    images, labels = preload(test.dataset)
    result = evaluate(loaded.model, batches(images, labels, 500), torch.device("cpu"))
    assert result.n_images == 10_000
    assert result.top1 == pytest.approx(loaded.meta["test_top1"], abs=2e-4)
