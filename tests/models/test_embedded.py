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
@pytest.mark.parametrize("name", ["vit_cifar10", "vit_cifar10_v2", "vit_cifar10_v3"])
def test_cifar10_reference_weights_reach_their_recorded_test_accuracy(name):
    root = shared_data("cifar10")
    loaded = load_model(name)
    trained_on = loaded.meta.get("trained_as")  # v3 is v2 trained on by a second schedule
    start = f"--init bench/models/assets/{trained_on}.pt" if trained_on else f"--model {name}"
    assert loaded.meta["command"].startswith(f"tokenbench train {start} --dataset cifar10"), loaded.meta["command"]
    test = datasets.build_dataset("cifar10", "test", datasets.eval_transform(loaded.model), str(root))
    images, labels = preload(test.dataset)
    result = evaluate(loaded.model, batches(images, labels, 500), torch.device("cpu"))
    assert result.n_images == 10_000
    assert result.top1 == pytest.approx(loaded.meta["test_top1"], abs=2e-4)


def test_a_trained_on_checkpoint_ships_under_a_new_name_with_the_same_weights(tmp_path):
    """`rename_checkpoint` re-labels weights for an architecture of the same shapes (v2 trained on ships as
    v3) and refuses one whose shapes differ."""
    from tokenbench.errors import BenchError
    from tokenbench.models.loading import asset, rename_checkpoint

    out = tmp_path / "v3.pt"
    rename_checkpoint(asset("vit_cifar10_v2.pt"), "vit_cifar10_v3", out)
    old, new = load_model(checkpoint=asset("vit_cifar10_v2.pt")), load_model(checkpoint=out)
    assert new.name == "vit_cifar10_v3" and new.meta["trained_as"] == "vit_cifar10_v2"
    assert new.meta["test_top1"] == old.meta["test_top1"]
    before, after = old.model.state_dict(), new.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(BenchError, match="does not fit vit_cifar10"):
        rename_checkpoint(asset("vit_cifar10_v2.pt"), "vit_cifar10", tmp_path / "v1.pt")
