"""DVT: early-exit semantics, per-image cost accounting, the paper's per-stage GMACs, budgeted thresholds,
training and checkpoints."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import shared_data, train_steps
from plain_vit import without_weights

from tokenbench.data import registry as datasets
from tokenbench.errors import BenchError
from tokenbench.methods.dvt import DVT
from tokenbench.methods.dvt.architecture import DVTCascade, EarlyExitDVT, upsample_grid
from tokenbench.methods.dvt.thresholds import exit_choice, search_thresholds
from tokenbench.models import loading as models
from tokenbench.reduce.ledger import CostLedger, flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method


def one_plane_at_a_time(t, size, dim):
    """The official resampling as written: each g x g plane of the moved axis on its own."""
    t = t.movedim(dim, -1)
    g = math.isqrt(t.shape[-1])
    planes = [F.adaptive_avg_pool2d(F.interpolate(p.reshape(1, 1, g, g), scale_factor=math.ceil(size / g)), size)
              for p in t.reshape(-1, t.shape[-1])]
    return torch.cat(planes).reshape(*t.shape[:-1], size * size).movedim(-1, dim)


@pytest.mark.parametrize("grid,size", [(4, 6), (6, 8), (7, 10), (10, 14)])  # digits/CIFAR, then DeiT-S at 224
def test_resampling_equals_the_per_plane_resampling_bit_for_bit(grid, size):
    torch.manual_seed(0)
    relations = torch.randn(2, 9, grid * grid, grid * grid)  # >= 8 planes side by side: the vectorised kernels
    for dim in (-1, -2):
        assert torch.equal(upsample_grid(relations, size, dim), one_plane_at_a_time(relations, size, dim))
    features = torch.randn(2, grid * grid, 48)
    assert torch.equal(upsample_grid(features, size, 1), one_plane_at_a_time(features, size, 1))


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


def test_costs_calibrate_on_one_pass_of_the_cascade_over_the_held_out_split(monkeypatch):
    """Every cost reuses the exit outputs of the first (same cascade, images, labels, criterion); the thresholds are
    those of a fresh pass; a changed weight, other images or another criterion run the cascade again."""
    from tokenbench.methods.dvt import thresholds

    model = cascade()
    torch.manual_seed(2)
    held_out = (torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,)))
    passes = []
    forward_exits = DVTCascade.forward_exits
    monkeypatch.setattr(DVTCascade, "forward_exits", lambda self, x: passes.append(len(x)) or forward_exits(self, x))
    method = get_method("dvt")
    first = [method.calibrate(model, held_out, cost)["thresholds"] for cost in (0.3, 0.5, 0.7)]
    assert passes == [24]
    thresholds._EXITS.clear()
    assert [method.calibrate(model, held_out, cost)["thresholds"] for cost in (0.3, 0.5, 0.7)] == first
    assert passes == [24, 24]
    method.calibrate(model, held_out, 0.5, "entropy")
    method.calibrate(model, (held_out[0][:20], held_out[1][:20]), 0.5)
    with torch.no_grad():
        model.stages[0].vit.head.weight.mul_(2.0)
    method.calibrate(model, held_out, 0.5)
    assert passes == [24, 24, 24, 20, 24]


def test_shipped_checkpoint_meets_its_budgets_on_the_val_split():
    method = get_method("dvt")
    path = method.checkpoint_for("vit_digits", "digits")
    assert path is not None, "methods/dvt/weights/dvt_digits.pt is missing"
    loaded = models.load_model(checkpoint=path)
    from tokenbench.data.images import preload

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


@pytest.mark.parametrize("backbone_name", ["vit_cifar10", "vit_cifar10_v2", "vit_cifar10_v3"])
def test_stages_start_from_a_backbone_and_the_matching_grid_reproduces_it(images, backbone_name):
    """--backbone: every stage takes the ViT's weights (patch and position embeddings resampled); the stage on
    the backbone's own grid, without reuse, is the backbone exactly (both backbones' shipped weights)."""
    from tokenbench.methods.dvt.architecture import init_from_backbone

    torch.manual_seed(0)
    backbone = models.load_model(backbone_name).model
    cascade_name = backbone_name.replace("vit_", "dvt_")
    cascade = timm.create_model(cascade_name, feature_reuse=False, relation_reuse=False).eval()
    init_from_backbone(cascade, backbone)
    with torch.inference_mode():
        outs = cascade.forward_exits(images)
        assert torch.equal(outs[-1], backbone(images))
        assert not torch.allclose(outs[0], outs[-1])
    coarse = cascade.stages[0].vit
    assert torch.equal(coarse.blocks[5].attn.qkv.weight, backbone.blocks[5].attn.qkv.weight)
    assert coarse.pos_embed.shape == (1, 1 + 16, backbone.embed_dim)
    init_from_backbone(timm.create_model(cascade_name), backbone)  # both reuses: the widened MLPs take it too
    with pytest.raises(BenchError, match="width"):
        init_from_backbone(timm.create_model("dvt_digits"), backbone)


def shipped_digits_val():
    from tokenbench.data.images import preload

    loaded = models.load_model(checkpoint=get_method("dvt").checkpoint_for("vit_digits", "digits"))
    split = {s: preload(datasets.build_dataset("digits", s, datasets.eval_transform(loaded.model)).dataset)
             for s in ("val", "test")}
    return loaded.model, split["val"], split["test"]


def test_exit_criteria_at_a_budget_random_meets_it_and_confidence_beats_it():
    """The paper's criterion ablation: random exit spends the budget (on the split its fractions were set on,
    and within 10% on the test split); max-softmax confidence is at least as accurate at no more GMACs."""
    model, val, test = shipped_digits_val()
    method = get_method("dvt")
    full = model.exit_gmacs(val[0][:1])[-1]
    for budget in (0.25, 0.4):
        measured = {}
        for criterion in ("confidence", "entropy", "random"):
            built = method.build(model, cost=budget, criterion=criterion, calibration=val)
            ledger = measure_gmacs(built, val[0])
            with torch.inference_mode():
                accuracy = (built(val[0]).argmax(-1) == val[1]).float().mean().item()
            measured[criterion] = (accuracy, ledger.gmacs.mean().item())
            assert measured[criterion][1] <= budget * full + 1e-12, criterion
        assert measured["random"][1] >= 0.9 * budget * full  # it spends the budget, not less
        assert measured["confidence"][0] >= measured["random"][0]
        assert measured["entropy"][0] >= measured["random"][0]
        on_test = measure_gmacs(method.build(model, cost=budget, criterion="random", calibration=val), test[0])
        assert on_test.gmacs.mean().item() == pytest.approx(budget * full, rel=0.1)


def test_random_exit_is_seeded_per_image_not_per_batch(images):
    model = cascade()
    torch.manual_seed(2)
    held_out = (torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,)))
    built = get_method("dvt").build(model, cost=0.5, criterion="random", calibration=held_out)

    def exits(batch):
        with CostLedger(len(batch)) as ledger:
            built(batch)
        return ledger.notes["exit_1"].tolist()

    together = exits(images)
    assert together == sum((exits(images[i:i + 1]) for i in range(len(images))), []) == exits(images)
    assert set(together) == {0.0, 1.0}, "some images leave at the first exit and some go on"


def test_criterion_is_a_checked_choice_and_sweeps_with_the_budget():
    method = get_method("dvt")
    with pytest.raises(BenchError, match="criterion='margin' is not one of confidence, entropy, random"):
        method.check_knobs({"criterion": "margin"})
    points = method.sweep_points({"cost": (0.2, 0.3), "criterion": ("confidence", "random")})
    assert points == [{"cost": 0.2, "criterion": "confidence"}, {"cost": 0.3, "criterion": "confidence"},
                      {"cost": 0.2, "criterion": "random"}, {"cost": 0.3, "criterion": "random"}]
    assert method.sweep_points()[0] == {"cost": 0.15, "criterion": "confidence"}


def test_dvt_ablation_prints_the_reuse_and_criterion_tables(capsys):
    from tokenbench.cli import main

    assert main(["dvt-ablation", "--budgets", "0.25,0.5"]) == 0
    out = capsys.readouterr().out
    reuse, criteria = out.split("Exit criterion:")
    rows = {line.split("|")[1].strip(): line for line in reuse.splitlines() if line.startswith("| ") and "reuse " not in line}
    assert set(rows) == {"none", "feature", "relation", "feature + relation"}
    cells = [c.strip() for c in rows["none"].split("|")]
    assert cells[2:4] == ["dvt_digits_noreuse.pt", "89.26"]  # the shipped cascade's own exit-1 top-1
    assert "budget 0.25: top-1 % (GMACs)" in criteria and "budget 0.5: top-1 % (GMACs)" in criteria
    assert [line.split("|")[1].strip() for line in criteria.splitlines()[3:]] == ["confidence", "entropy", "random"]


def test_reuse_table_charges_reuse_over_the_cascade_without_it(images):
    from tokenbench.methods.dvt.ablation import reuse_table

    labels = torch.arange(len(images)) % 10
    table = reuse_table({"both": cascade(), "none": cascade(feature_reuse=False, relation_reuse=False)}, images, labels)
    assert list(table["reuse"]) == ["none", "feature + relation"] * 3
    extra = table.set_index(["reuse", "exit"])["reuse GMACs +%"]
    assert extra[("none", 2)] == 0 and extra[("feature + relation", 1)] == 0  # nothing to reuse at the first exit
    assert extra[("feature + relation", 2)] > 0 and extra[("feature + relation", 3)] > 0


SHIPPED_CASCADES = sorted(p.name for p in DVT.weights_file("").glob("dvt_*.pt"))


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_four_cascades_ship_per_dataset_one_per_reuse_setting(dataset):
    """The paper's reuse ablation needs the same cascade trained four ways, each with the command that made it
    (on the first backbone of each dataset; `dvt_cifar10_v2` ships the full cascade only)."""
    from tokenbench.methods.dvt.ablation import reuse_label

    found = {}
    for name in SHIPPED_CASCADES:
        loaded = models.load_model(checkpoint=DVT.weights_file(name))
        if loaded.meta["dataset"] == dataset and loaded.name == f"dvt_{dataset}":
            command = loaded.meta["command"]
            assert command.startswith(f"tokenbench train --model dvt_{dataset} --method dvt --reuse "), command
            found[reuse_label(loaded.model)] = command.split("--reuse ")[1].split()[0]
    assert found == {"feature + relation": "both", "feature": "feature", "relation": "relation", "none": "none"}


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED_CASCADES)
def test_shipped_cascades_reach_their_recorded_exit_accuracies(name):
    from tokenbench.data.images import preload
    from tokenbench.methods.dvt.ablation import reuse_table

    loaded = models.load_model(checkpoint=DVT.weights_file(name))
    dataset = loaded.meta["dataset"]
    root = str(shared_data("cifar10")) if dataset == "cifar10" else None
    images, labels = preload(datasets.build_dataset(dataset, "test", datasets.eval_transform(loaded.model), root).dataset)
    table = reuse_table({name: loaded.model}, images, labels)
    recorded = loaded.meta["exit_test_top1"]
    assert list(table["top-1 %"] / 100) == pytest.approx(recorded, abs=2 / len(labels))
    assert recorded[-1] == pytest.approx(loaded.meta["test_top1"], abs=1e-12)


def test_calibrate_prints_the_thresholds_of_the_shipped_cascade(tmp_path, capsys):
    """`tokenbench calibrate --method dvt` finds the cascade shipped for vit_digits and reports thresholds that
    keep the cost on the held-out split within the budget."""
    import json

    from tokenbench.cli import main

    out = tmp_path / "thresholds.json"
    assert main(["calibrate", "--method", "dvt", "--cost", "0.3", "--out", str(out)]) == 0
    assert "dvt_digits.pt" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert len(row["thresholds"]) == 2 and row["gmacs_fraction"] <= 0.3 + 1e-9 and row["top1"] > 0.85


def test_the_digits_cascade_preprocesses_as_the_embedded_digits_models():
    from tokenbench.methods.dvt import architecture

    assert architecture.DIGITS_PREPROCESSING == models.DIGITS_PREPROCESSING


def test_the_criterion_knob_offers_exactly_the_criteria_thresholds_knows():
    from tokenbench.methods.dvt.thresholds import CRITERIA

    assert DVT.knobs[1].choices == CRITERIA
