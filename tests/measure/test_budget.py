"""Matched compute: the knob search for a GMACs budget, and `bench --budget` end to end."""

import math

import pytest
import timm
import torch
from plain_vit import one_thread  # noqa: F401  (autouse fixture)

from tokenbench.cli import main
from tokenbench.errors import BenchError
from tokenbench.measure.budget import candidates, dense_gmacs, matched_points, search_knobs, spread
from tokenbench.measure.results import read_results
from tokenbench.models.loading import save_checkpoint
from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_digits").eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def cost(model, method, knobs, images):
    return measure_gmacs(get_method(method).build(model, **knobs), images).gmacs.mean().item()


def test_candidates_run_from_the_noop_outward(vit):
    keep = candidates(get_method("topk").knobs[0], vit)
    assert keep[:3] == [1.0, 0.995, 0.99] and keep[-1] == 0.005 and len(keep) == 200
    assert candidates(get_method("ats").knobs[0], vit)[:3] == [math.inf, 1.0, 0.995]
    assert candidates(get_method("tome").knobs[0], vit)[:3] == [0, 1, 2]
    merged = candidates(get_method("vidtldr").knobs[0], vit)  # a fraction merged: from 0 up, below 1
    assert merged[:3] == [0.0, 0.005, 0.01] and merged[-1] == 0.995


@pytest.mark.parametrize("method", ["topk", "evit", "tome", "vidtldr"])
def test_fixed_rate_choice_is_the_largest_within_budget(vit, images, method):
    dense = dense_gmacs(vit, images)
    choice = search_knobs(get_method(method), vit, 0.6, images, dense)
    assert not choice.adaptive and choice.gmacs <= 0.6 * dense
    assert choice.gmacs == pytest.approx(cost(vit, method, choice.knobs, images))
    # One step back towards the no-op would exceed the budget.
    knob = get_method(method).knobs[0]
    values = candidates(knob, vit)
    previous = values[values.index(choice.knobs[knob.name]) - 1]
    assert cost(vit, method, {**choice.knobs, knob.name: previous}, images) > 0.6 * dense


def test_adaptive_method_is_calibrated_on_every_held_out_image(vit):
    sharp = timm.create_model("vit_digits").eval()
    sharp.load_state_dict(vit.state_dict())
    with torch.no_grad():
        for blk in sharp.blocks:
            blk.attn.qkv.weight.mul_(6)  # peaky attention: ATS keeps a different number per image
    held_out = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    dense = dense_gmacs(sharp, held_out)
    choice = search_knobs(get_method("ats"), sharp, 0.5, held_out, dense)
    assert choice.adaptive and choice.gmacs <= 0.5 * dense
    assert choice.gmacs == pytest.approx(cost(sharp, "ats", choice.knobs, held_out))


def test_unreachable_budget_skips_the_method(vit, images, capsys):
    assert matched_points(get_method("evit"), vit, 0.05, (images, None), dense_gmacs(vit, images)) == []
    assert "evit: skipped, evit cannot reach 0.05 x dense" in capsys.readouterr().out
    with pytest.raises(BenchError, match="must be positive"):
        matched_points(get_method("evit"), vit, 0.0, (images, None), 1.0)


def test_bench_budget_records_requested_and_achieved(tmp_path, vit):
    checkpoint = tmp_path / "vit_digits_random.pt"
    save_checkpoint(checkpoint, vit, "vit_digits", {})
    argv = ["bench", "--method", "none,topk", "--budget", "0.6", "--checkpoint", checkpoint,
            "--out", tmp_path / "out", "--no-timing", "--batch-size", "64", "--cache-dir", tmp_path / "cache"]
    assert main([str(a) for a in argv]) == 0
    rows = {r.method: r for r in read_results(tmp_path / "out" / "results.jsonl")}
    assert set(rows) == {"none", "topk"}
    assert all(r.budget == 0.6 for r in rows.values())
    assert rows["none"].budget_achieved == pytest.approx(1.0)
    assert 0.55 < rows["topk"].budget_achieved <= 0.6


@pytest.mark.slow
def test_dvt_finds_its_budget_above_its_first_exit():
    """A cost fraction below the first exit's cost cannot be built; the search starts where building does."""
    from tokenbench.data import registry as datasets
    from tokenbench.data.images import preload
    from tokenbench.models import loading as models
    from tokenbench.reduce.registry import get_method

    method = get_method("dvt")
    loaded = models.load_model(checkpoint=method.checkpoint_for("vit_digits", "digits"))
    val = preload(datasets.build_dataset("digits", "val", datasets.eval_transform(loaded.model)).dataset)
    dense = 0.09707
    choice = search_knobs(method, loaded.model, 0.1, val[0], dense, {"calibration": val})
    first_exit = loaded.model.exit_gmacs(val[0][:1])[0]
    assert first_exit <= choice.gmacs <= 0.1 * dense and choice.adaptive


def test_an_adaptive_method_calibrates_on_images_spread_over_the_split_not_its_first():
    """CIFAR-10's val split is stored class by class: its first 256 images are all airplanes."""
    labels = torch.arange(10).repeat_interleave(500)  # 5,000 images, class by class
    chosen = spread(labels, 256)
    assert len(chosen) == 256 and chosen[0] == 0 and chosen[-1] == 9
    assert min(torch.bincount(chosen).tolist()) >= 25  # every class, about equally
    assert torch.equal(spread(labels[:100], 256), labels[:100])
