"""Fine-tuning any registered method with `tokenbench train --method X --init CHECKPOINT`."""

import argparse
import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import train_steps
from torchvision import transforms

from tokenbench.cli import main
from tokenbench.cli.train import method_knobs
from tokenbench.errors import BenchError
from tokenbench.models import loading as models
from tokenbench.reduce.registry import get_method, knob_by_name
from tokenbench.run import training as training


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
    from tokenbench.data import images as data
    from tokenbench.data import registry as datasets

    def mirrorable_digits(split, transform, root=None):
        return dataclasses.replace(data.digits(split, transform, root), mirror_invariant=True)

    monkeypatch.setitem(datasets.DATASETS, "mirrorable-digits", mirrorable_digits)
    seen = []
    monkeypatch.setattr(training, "train", lambda model, train_set, *a, **k: seen.append(train_set) or [{}])
    model = "vit_video_digits" if dataset == "moving-digits" else "vit_digits"
    assert main(["train", "--model", model, "--dataset", dataset, "--epochs", "1", "--out", str(tmp_path / "m.pt")]) == 0
    steps = seen[0].transform.transforms
    assert any(isinstance(t, transforms.RandomHorizontalFlip) for t in steps) == mirrored


def test_the_strong_recipe_trains_a_backbone_on_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """`--init` with `--recipe strong` (a second schedule for a reference backbone): the checkpoint's weights with
    the recipe's stochastic depth and EMA; a method with the recipe is still refused."""
    from timm.layers import DropPath

    start = tmp_path / "start.pt"
    torch.manual_seed(0)
    models.save_checkpoint(start, timm.create_model("vit_digits", depth=2).eval(), "vit_digits", {}, {"depth": 2})
    seen = []
    ended = {"epoch": 1, "val_top1": 0.5, "ema_val_top1": 0.75}  # the EMA scored higher: the model ends with it
    monkeypatch.setattr(training, "train", lambda model, train_set, cfg, **k: seen.append((model, cfg)) or [ended])
    assert main(["train", "--init", str(start), "--recipe", "strong", "--epochs", "1", "--out",
                 str(tmp_path / "on.pt")]) == 0
    assert models.read_checkpoint(tmp_path / "on.pt")["meta"]["val_top1"] == 0.75  # the weights it ships
    model, cfg = seen[0]
    assert isinstance(model.blocks[1].drop_path1, DropPath) and cfg.ema_decay == training.RECIPES["strong"]["ema_decay"]
    initial = models.read_checkpoint(start)["state_dict"]
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert main(["train", "--init", str(start), "--method", "evit", "--recipe", "strong", "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "drop --method" in capsys.readouterr().err


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path):
    """State saved after every epoch: stopping after epoch 1 and resuming ends where one run ends."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,)))
    cfg = training.TrainConfig(epochs=3, batch_size=16, lr=1e-3, warmup_epochs=1)

    def fresh():
        torch.manual_seed(0)
        return timm.create_model("vit_digits", depth=2)

    straight = fresh()
    training.train(straight, data, cfg, log=lambda line: None)

    class Interrupted(Exception):
        pass

    def stop(line):
        raise Interrupted

    state, identity = tmp_path / "run.partial", {"lr": 1e-3}
    resumed = fresh()
    with pytest.raises(Interrupted):
        training.train(resumed, data, cfg, log=stop, state_file=state, identity=identity)
    resumed = fresh()  # a new process: nothing but the state file carries over
    torch.manual_seed(123)
    lines = []
    history = training.train(resumed, data, cfg, log=lines.append, state_file=state, identity=identity)
    assert lines[0].startswith("resuming after epoch 1") and [h["epoch"] for h in history] == [1, 2, 3]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(BenchError, match="other settings"):
        training.train(fresh(), data, cfg, state_file=state, identity={"lr": 2e-3})


def test_train_refuses_to_overwrite_an_interrupted_run(tmp_path, capsys):
    (tmp_path / "m.pt.partial").write_bytes(b"state")
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "m.pt")]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


def test_a_compact_resume_state_loads_as_the_model_its_ema_holds(tmp_path):
    """`--checkpoint OUT.partial`: the model its identity names, with the EMA's weights (what val and the probes
    measured), although the state also holds numpy random streams."""
    from types import SimpleNamespace

    import numpy as np

    torch.manual_seed(0)
    model, ema = timm.create_model("vit_digits"), timm.create_model("vit_digits")
    state = tmp_path / "run.pt.partial"
    training.save_state(state, model, None, 7, [], torch.Generator().manual_seed(0), {"model": "vit_digits"},
                        ema=SimpleNamespace(module=ema), compact=True)
    assert isinstance(torch.load(state, weights_only=False)["numpy_rng"][1], np.ndarray)
    loaded = models.load_model(checkpoint=state)
    assert loaded.name == "vit_digits" and loaded.weights.startswith("file:run.pt.partial@sha256:")
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, ema.state_dict()[name].half().float()), name
