"""Fine-tuning any registered method with `tokenbench train --method X --init CHECKPOINT`."""

import argparse
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms

from tokenbench import models
from tokenbench.cli import main
from conftest import train_steps
from tokenbench.commands.train import method_knobs
from tokenbench.registry import get_method, knob_by_name


def args_with(**given):
    return argparse.Namespace(**{name: given.get(name) for name in knob_by_name()})


def test_knobs_to_train_at():
    assert method_knobs(get_method("evit"), args_with()) == {"keep": 0.7}  # the middle of its sweep
    assert method_knobs(get_method("evit"), args_with(keep="0.5")) == {"keep": 0.5}
    assert method_knobs(get_method("dynamicvit"), args_with()) == {"rho": 0.7}  # its own default (the paper's rho)
    assert method_knobs(get_method("dvt"), args_with(cost="0.5")) == {}  # the budget only matters at inference


def test_fine_tuning_with_a_method_trains_the_shared_backbone(tmp_path, tiny_vit, digit_images):
    trainee, loss = get_method("evit").training_loss(tiny_vit, keep=0.5)
    assert loss is None and trainee.vit is tiny_vit
    labels = torch.arange(4)
    trainee.train()
    losses = train_steps(lambda: F.cross_entropy(trainee(digit_images), labels), trainee.parameters(), steps=4)
    assert losses[-1] < losses[0]
    tiny_vit.eval()
    path = tmp_path / "evit_ft.pt"
    models.save_checkpoint(path, tiny_vit, "vit_digits", {"trained_with": "evit", "knobs": {"keep": 0.5}})
    loaded = models.load_model(checkpoint=path)
    assert loaded.meta["trained_with"] == "evit" and loaded.weights.startswith("file:evit_ft.pt")
    with torch.inference_mode():
        assert torch.equal(loaded.model(digit_images), tiny_vit(digit_images))


@pytest.mark.parametrize("dataset, mirrored", [("digits", False), ("moving-digits", False), ("mirrorable-digits", True)])
def test_training_mirrors_only_mirror_invariant_datasets(tmp_path, monkeypatch, dataset, mirrored):
    from tokenbench import data, datasets
    from tokenbench import training

    def mirrorable_digits(split, transform, root=None):
        return dataclasses.replace(data.digits(split, transform, root), mirror_invariant=True)

    monkeypatch.setitem(datasets.DATASETS, "mirrorable-digits", mirrorable_digits)
    seen = []
    monkeypatch.setattr(training, "train", lambda model, train_set, *a, **k: seen.append(train_set) or [{}])
    model = "vit_video_digits" if dataset == "moving-digits" else "vit_digits"
    assert main(["train", "--model", model, "--dataset", dataset, "--epochs", "1", "--out", str(tmp_path / "m.pt")]) == 0
    steps = seen[0].transform.transforms
    assert any(isinstance(t, transforms.RandomHorizontalFlip) for t in steps) == mirrored
