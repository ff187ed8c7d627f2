"""Intervals and tests on per-image outcomes, and the leaderboard that shows them."""

import numpy as np
import pytest
from scipy.stats import binomtest

from tokenbench.cli import main
from tokenbench.measure.results import read_results
from tokenbench.measure.stats import correct_from_bits, decimals_for, delta_ci, holm, mcnemar, outcome_fields
from tokenbench.report.leaderboard import load_rows, write_leaderboard


def outcomes(n, p, seed):
    return np.random.default_rng(seed).random(n) < p


def test_the_multinomial_bootstrap_is_the_paired_bootstrap():
    """Resampling images and averaging their differences, written out, gives the same interval."""
    method, reference = outcomes(300, 0.8, 1), outcomes(300, 0.7, 2)
    diff = method.astype(int) - reference.astype(int)
    rng = np.random.default_rng(5)
    resampled = 100 * diff[rng.integers(0, 300, size=(20_000, 300))].mean(axis=1)
    explicit = np.percentile(resampled, [2.5, 97.5])
    assert delta_ci(method, reference) == pytest.approx(tuple(explicit), abs=0.35)  # Monte Carlo error only


def test_delta_ci_centres_on_the_difference_and_shrinks_with_more_images():
    small = delta_ci(outcomes(200, 0.8, 1), outcomes(200, 0.8, 1))
    assert small == (0.0, 0.0)  # the same outcomes: no difference in any resample
    a, b = outcomes(500, 0.85, 3), outcomes(500, 0.75, 4)
    low, high = delta_ci(a, b)
    observed = 100 * (a.mean() - b.mean())
    assert low < observed < high and low > 0
    big_low, big_high = delta_ci(np.tile(a, 10), np.tile(b, 10))
    assert big_high - big_low < (high - low) / 2


def test_mcnemar_is_the_exact_binomial_test_on_discordant_images():
    a = np.array([True] * 10 + [False] * 3 + [True] * 50)
    b = np.array([False] * 10 + [True] * 3 + [True] * 50)
    assert mcnemar(a, b) == pytest.approx(binomtest(10, 13, 0.5).pvalue)
    assert mcnemar(a, b) == mcnemar(b, a)
    assert mcnemar(a, a) == 1.0
    assert mcnemar(np.ones(10, bool), np.zeros(10, bool)) == pytest.approx(2 * 0.5 ** 10)


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 is capped at 1


def test_decimals_follow_the_image_count():
    assert [decimals_for(n) for n in (50, 100, 540, 10_000, 50_000)] == [0, 0, 1, 2, 3]


def test_outcomes_round_trip_compactly():
    correct = outcomes(1001, 0.6, 7)
    fields = outcome_fields(correct, np.arange(1001) % 10)
    assert np.array_equal(correct_from_bits(fields["correct_bits"], 1001), correct)
    assert len(fields["correct_bits"]) < 1001 / 5 and len(fields["image_key"]) == 16


def test_a_sweep_without_the_dense_model_measures_it_and_the_board_shows_intervals(tmp_path, checkpoint):
    assert main(["bench", "--method", "topk", "--keep", "0.5", "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path), "--no-timing", "--split", "val"]) == 0
    rows = read_results(tmp_path / "results.jsonl")
    assert [(r.method, r.baseline) for r in rows] == [("none", True), ("topk", None)]
    dense, topk = rows
    assert dense.image_key == topk.image_key and len(correct_from_bits(topk.correct_bits, topk.n_images)) == 179
    assert correct_from_bits(topk.correct_bits, topk.n_images).mean() == pytest.approx(topk.top1)
    board = write_leaderboard(tmp_path).read_text()
    line = next(line for line in board.splitlines() if line.startswith("| topk"))
    delta = 100 * (topk.top1 - dense.top1)
    low, high = delta_ci(correct_from_bits(topk.correct_bits, 179), correct_from_bits(dense.correct_bits, 179))
    assert f"{delta:+.1f} ({low:+.1f}, {high:+.1f})" in line  # 179 images: one decimal


def test_matched_budgets_mark_methods_significantly_better_than_the_baselines(tmp_path, checkpoint, monkeypatch):
    """At one budget, a method right on every image beats random and top-k; one no better is not marked."""
    assert main(["bench", "--method", "none,random,topk,tome", "--budget", "0.5", "--checkpoint", str(checkpoint),
                 "--out", str(tmp_path), "--no-timing"]) == 0
    import json

    path = tmp_path / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:  # make the outcomes clear-cut: tome right everywhere, random and topk right on half
        n = row["n_images"]
        right = np.ones(n, bool) if row["method"] == "tome" else np.arange(n) % 2 == 0
        row["correct_bits"] = outcome_fields(right, np.zeros(n))["correct_bits"]
        row["top1"] = right.mean()
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = load_rows(tmp_path)
    assert table["budget"].eq(0.5).all()
    board = write_leaderboard(tmp_path).read_text()
    marks = {line.split("|")[1].strip(): line.rstrip("|").split("|")[-1].strip()
             for line in board.splitlines() if line.startswith("| ") and "method" not in line}
    assert marks["tome"] == "random, topk" and marks["topk"] == "" and marks["random"] == ""


def test_a_separately_trained_model_never_takes_the_backbone_s_front():
    """DVT's cascade at 93.9% above the 92.8% dense model: the training-free methods keep their own front."""
    import pandas as pd

    from tokenbench.report.leaderboard import fronts

    g = pd.DataFrame({
        "method": ["none", "tome", "tome", "topk", "dvt", "dvt"],
        "weights": ["embedded:vit", "embedded:vit", "embedded:vit", "embedded:vit", "file:dvt", "file:dvt"],
        "top1": [0.928, 0.926, 0.917, 0.900, 0.939, 0.930],
        "gmacs": [0.097, 0.033, 0.022, 0.050, 0.030, 0.011],
    })
    assert fronts(g, "gmacs").tolist() == ["★", "★", "★", "", "☆", "☆"]


def test_a_baseline_that_spent_much_less_is_not_a_method_s_to_beat():
    """downsample's resolutions come in whole patches: at a budget it may spend far less. A method is credited
    with beating a baseline only if that baseline spent at least 95% of the method's GMACs."""
    import pandas as pd

    from tokenbench.report.leaderboard import better_than

    n = 200
    half, every = np.arange(n) % 2 == 0, np.ones(n, bool)
    spec = [("none", 1.0, every), ("random", 0.49, half), ("downsample", 0.37, half), ("tome", 0.44, every),
            ("mctf", 0.38, every)]
    g = pd.DataFrame([{"method": m, "gmacs": gmacs, "budget": 0.5, "n_images": n, "image_key": "k",
                       "top1": right.mean(), **outcome_fields(right, np.zeros(n))} for m, gmacs, right in spec])
    # tome spent 0.44: downsample's 0.37 is under 95% of it; mctf spent 0.38, which 0.37 is not
    assert better_than(g).tolist() == ["", "", "", "random", "random, downsample"]
