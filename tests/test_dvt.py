"""DVT: early-exit semantics, per-image cost accounting, the paper's per-stage GMACs, budgeted thresholds,
training and checkpoints."""

import numpy as np
import pytest
import timm
import torch
from conftest import train_steps
from plain_vit import without_weights

from tokenbench import datasets, models
from tokenbench.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.errors import BenchError
from tokenbench.registry import get_method
from tokenbench.methods.dvt import EarlyExitDVT
from tokenbench.methods.dvt.architecture import DVTCascade
from tokenbench.methods.dvt.thresholds import exit_choice, search_thresholds


def cascade(**reuse):
    torch.manual_seed(0)
    return timm.create_model("dvt_digits", **reuse).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(6, 3, 32, 32)


@pytest.mark.parametrize("reuse", [dict(), dict(feature_reuse=False, relation_reuse=False)])
def test_thresholds_above_one_equal_the_last_stage(reuse, images):
    model = cascade(**reuse)
    with torch.inference_mode():
        last = model.forward_exits(images)[-1]
        out = EarlyExitDVT(model, [1.5, 1.5])(images)
    assert torch.equal(out, last)
    ledger = measure_gmacs(EarlyExitDVT(model, [1.5, 1.5]), images)
    assert torch.allclose(ledger.gmacs, torch.tensor(model.exit_gmacs(images)[-1], dtype=torch.float64))
    assert ledger.notes["exit_3"].tolist() == [1.0] * 6 and ledger.notes["exit_1"].sum() == 0


def test_first_threshold_zero_exits_everything_at_the_first_stage(images):
    model = cascade()
    with torch.inference_mode():
        first = model.forward_exits(images)[0]
    ledger = measure_gmacs(EarlyExitDVT(model, [0.0, 1.5]), images)
    with torch.inference_mode():
        assert torch.equal(EarlyExitDVT(model, [0.0, 1.5])(images), first)
    stage_one = model.stages[0]
    alone = measure_gmacs(stage_one, images)  # the first stage by itself, no reuse
    assert torch.equal(ledger.gmacs, alone.gmacs)
    assert ledger.notes["exit_1"].tolist() == [1.0] * 6 and ledger.notes["exit_2"].sum() == 0
    tokens = ledger.tokens_per_block()
    assert tokens.shape == (6, 12) and (tokens[:, :4] == 17).all() and (tokens[:, 4:] == 0).all()


def test_each_image_pays_only_for_the_stages_it_ran(images):
    model = cascade()
    costs = model.exit_gmacs(images)
    with torch.inference_mode():
        conf = [p.softmax(-1).amax(-1) for p in model.forward_exits(images)]
    thresholds = [float(conf[0].median()), float(conf[1].median())]
    ledger = measure_gmacs(EarlyExitDVT(model, thresholds), images)
    chosen = exit_choice(torch.stack(conf).numpy(), thresholds)
    assert np.allclose(ledger.gmacs.numpy(), costs[chosen])
    for k in range(3):
        assert ledger.notes[f"exit_{k + 1}"].tolist() == (chosen == k).astype(float).tolist()


def test_ledger_matches_torch_flop_counter_with_reuse(images):
    model = cascade()
    counted = measure_gmacs(model, images[:1]).matmul_gmacs.item()
    assert counted == pytest.approx(flop_counter_gmacs(model, images[:1]), rel=1e-9)


def test_paper_deit_small_cascade_stage_gmacs():
    model = without_weights(lambda: timm.create_model("dvt_deit_small", feature_reuse=False, relation_reuse=False))
    assert [s.grid for s in model.stages] == [7, 10, 14]
    image = torch.zeros(1, 3, 224, 224, device=model.stages[0].vit.cls_token.device)
    cumulative = model.exit_gmacs(image)
    assert np.round(np.diff(cumulative, prepend=0), 3).tolist() == [1.145, 2.305, 4.608]
    reusing = without_weights(lambda: timm.create_model("dvt_deit_small"))
    with_reuse = reusing.exit_gmacs(image.to(reusing.stages[0].vit.cls_token.device))
    assert with_reuse[0] == cumulative[0] and (with_reuse[1:] > cumulative[1:]).all()


def synthetic_exits(n=180, seed=0):
    """Three exits whose confidence predicts correctness, later exits more accurate."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.2, 1.0, size=(3, n))
    skill = np.array([0.5, 0.7, 0.9])[:, None]
    correct = rng.uniform(size=(3, n)) < skill * conf + (1 - conf) * 0.3
    return conf, correct


def test_thresholds_meet_the_budget_and_exits_move_with_it():
    conf, correct = synthetic_exits()
    costs = np.array([1.0, 3.0, 8.0])
    fractions = []
    for budget in (0.2, 0.4, 0.6, 0.9):
        t = search_thresholds(conf, correct, costs, budget * costs[-1])
        chosen = exit_choice(conf, t)
        assert costs[chosen].mean() <= budget * costs[-1] + 1e-9
        fractions.append(np.bincount(chosen, minlength=3) / len(chosen))
    first, last = [f[0] for f in fractions], [f[2] for f in fractions]
    assert first[0] > first[-1] and last[0] < last[-1]
    with pytest.raises(BenchError, match="below the first exit"):
        search_thresholds(conf, correct, costs, 0.5)


def test_method_calibrates_on_held_out_images_under_the_budget(images):
    model = cascade()
    torch.manual_seed(2)
    held_out = (torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,)))
    method = get_method("dvt")
    costs = model.exit_gmacs(images)
    built = method.build(model, cost=0.5, calibration=held_out)
    assert measure_gmacs(built, held_out[0]).gmacs.mean().item() <= 0.5 * costs[-1] + 1e-12
    assert isinstance(method.build(model, cost=1.0).cascade, DVTCascade)
    with pytest.raises(BenchError, match="held-out"):
        method.build(model, cost=0.5)
    with pytest.raises(BenchError, match="cascade"):
        method.build(timm.create_model("vit_digits"), cost=0.5)


def test_shipped_checkpoint_meets_its_budgets_on_the_val_split():
    method = get_method("dvt")
    path = method.checkpoint_for("vit_digits", "digits")
    assert path is not None, "bench/assets/dvt_digits.pt is missing"
    loaded = models.load_model(checkpoint=path)
    from tokenbench.harness import preload

    val = preload(datasets.build_dataset("digits", "val", datasets.eval_transform(loaded.model)).dataset)
    costs = loaded.model.exit_gmacs(val[0])
    firsts = []
    for budget in (0.3, 0.8):
        ledger = measure_gmacs(method.build(loaded.model, cost=budget, calibration=val), val[0])
        assert ledger.gmacs.mean().item() <= budget * costs[-1] + 1e-12
        firsts.append(ledger.notes["exit_1"].mean().item())
    assert firsts[0] > firsts[1]


def test_training_lowers_the_loss_and_checkpoints_reload_exactly(tmp_path, images):
    model = cascade()
    trainee, loss = get_method("dvt").training_loss(model)
    labels = torch.arange(6) % 10
    trainee.train()
    losses = train_steps(lambda: loss(trainee, images, labels), trainee.parameters(), steps=5)
    assert losses[-1] < losses[0]
    model.eval()
    path = tmp_path / "dvt.pt"
    models.save_checkpoint(path, model, "dvt_digits", {"trained_with": "dvt"}, {"feature_reuse": True})
    loaded = models.load_model(checkpoint=path).model
    with torch.inference_mode():
        assert torch.equal(loaded(images), model(images))


def test_stages_start_from_a_backbone_and_the_matching_grid_reproduces_it(images):
    """--backbone: every stage takes the ViT's weights (patch and position embeddings resampled); the stage on
    the backbone's own grid, without reuse, is the backbone exactly."""
    from tokenbench.methods.dvt.architecture import init_from_backbone

    backbone = models.load_model(checkpoint=models.asset("vit_cifar10.pt")).model
    cascade = timm.create_model("dvt_cifar10", feature_reuse=False, relation_reuse=False).eval()
    init_from_backbone(cascade, backbone)
    with torch.inference_mode():
        outs = cascade.forward_exits(images)
        assert torch.equal(outs[-1], backbone(images))
        assert not torch.allclose(outs[0], outs[-1])
    coarse = cascade.stages[0].vit
    assert torch.equal(coarse.blocks[5].attn.qkv.weight, backbone.blocks[5].attn.qkv.weight)
    assert coarse.pos_embed.shape == (1, 1 + 16, 64)
    with pytest.raises(BenchError, match="width"):
        init_from_backbone(timm.create_model("dvt_digits"), backbone)
