"""`tokenbench compare`: a method against a baseline on the same images, from the rows' per-image outcomes."""

import json
from pathlib import Path

import numpy as np
import pytest

from tokenbench.cli import main
from tokenbench.errors import BenchError
from tokenbench.measure.stats import outcome_fields
from tokenbench.report.compare import compare

REPO = Path(__file__).resolve().parents[2]


def test_topk_against_random_on_the_v1_cifar10_board(capsys):
    """The v1 backbone's finding, recomputed from results/cifar10-v1 alone: random beats top-k at keep 0.5 to 0.7
    by more than sampling noise, and the two are indistinguishable at 0.9 and 0.8."""
    table = compare(REPO / "results" / "cifar10-v1", "topk", "random").set_index("setting")
    half = table.loc["keep=0.5"]
    assert (half["topk %"], half["random %"]) == pytest.approx((59.45, 63.22))
    assert (half["difference"], half["95% low"], half["95% high"]) == pytest.approx((-3.77, -4.70, -2.83), abs=0.005)
    assert (table.loc[["keep=0.7", "keep=0.6", "keep=0.5"], "95% high"] < 0).all()
    assert (table.loc[["keep=0.9", "keep=0.8"], "95% low"] < 0).all()
    assert (table.loc[["keep=0.9", "keep=0.8"], "95% high"] > 0).all()
    assert table.loc["budget 0.5", "difference"] == pytest.approx(-3.77)  # matched budgets pair too
    assert (table["images"] == 10000).all()
    assert main(["compare", "--results", str(REPO / "results" / "cifar10-v1"), "--method", "topk",
                 "--baseline", "random"]) == 0
    assert "keep=0.5" in capsys.readouterr().out


def test_topk_against_random_on_the_v2_cifar10_board():
    """The same on the committed board's stronger backbone (vit_cifar10_v2, results/cifar10): random still beats
    top-k, now from keep 0.8 down, as docs/cifar10-v2-training.md reports."""
    table = compare(REPO / "results" / "cifar10", "topk", "random").set_index("setting")
    assert (table.loc["keep=0.5", "topk %"], table.loc["keep=0.5", "random %"]) == pytest.approx((68.15, 71.59))
    differences = table.loc[[f"keep={k}" for k in (0.9, 0.8, 0.7, 0.6, 0.5)], "difference"]
    assert differences.tolist() == pytest.approx([-0.09, -1.33, -1.82, -2.57, -3.44], abs=0.005)
    assert (table.loc[["keep=0.8", "keep=0.7", "keep=0.6", "keep=0.5"], "95% high"] < 0).all()
    assert table.loc["keep=0.9", "95% low"] < 0 < table.loc["keep=0.9", "95% high"]
    assert (table["images"] == 10000).all()


def write_rows(folder, rows):
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def row(method, correct, labels):
    """A committed digits row, as `method` at keep 0.5 with these per-image outcomes."""
    template = json.loads((REPO / "results" / "digits" / "results.jsonl").read_text().splitlines()[0])
    return {**template, "method": method, "knobs": {"keep": 0.5}, "budget": None, "cell_id": method,
            "n_images": len(correct), "top1": float(np.mean(correct)),
            **outcome_fields(np.asarray(correct), np.asarray(labels))}


def test_rows_on_other_images_are_never_paired(tmp_path):
    labels = np.arange(8) % 3
    write_rows(tmp_path / "r", [row("topk", [1, 1, 1, 1, 0, 0, 0, 0], labels),
                                row("random", [1, 1, 0, 0, 0, 0, 0, 0], labels[::-1])])
    with pytest.raises(BenchError, match="share no setting on the same images"):
        compare(tmp_path / "r", "topk", "random")
    with pytest.raises(BenchError, match="no rows of 'evit'.*methods there: random, topk"):
        compare(tmp_path / "r", "evit", "random")


def test_the_difference_is_paired_image_by_image(tmp_path):
    labels = np.arange(8) % 3
    write_rows(tmp_path / "r", [row("topk", [1, 1, 1, 1, 0, 0, 0, 0], labels),
                                row("random", [1, 1, 0, 0, 0, 0, 0, 0], labels)])
    (line,) = compare(tmp_path / "r", "topk", "random").to_dict("records")
    assert line["difference"] == pytest.approx(25.0) and line["images"] == 8
    assert line["McNemar p"] == pytest.approx(0.5)  # 2 images only topk gets right, none the other way
