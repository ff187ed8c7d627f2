"""`tokenbench class-attention`: the most, random or least class-attended tokens kept, block by block."""

import numpy as np
import pytest
import torch

from tokenbench import api
from tokenbench.cli import main
from tokenbench.measure.class_attention import (
    ClassAttentionOrder,
    correct_per_image,
    nearest_kept_gap,
    probe,
    rank_in_window,
)
from tokenbench.reduce import KeepRateReducer, TokenReducedViT


@pytest.fixture(scope="module")
def digits():
    model = api.load_model("vit_digits")
    images, labels = api.load_images(model, "digits", "test")
    return model, images[:48], labels[:48]


@pytest.fixture(scope="module")
def table(digits):
    return probe(*digits, keep=0.5)


def test_the_most_attended_at_every_block_is_topk_image_for_image(digits, table):
    model, images, labels = digits
    assert list(table["blocks"]) == ["none (dense)"] + [b for b in ["3", "6", "9"] for _ in range(4)] + ["3/6/9"] * 3
    topk = correct_per_image(api.apply(model, "topk", keep=0.5), images, labels, 32)
    most = correct_per_image(TokenReducedViT(model, {b: ClassAttentionOrder(0.5, "most", torch.Generator())
                                                     for b in (3, 6, 9)}), images, labels, 32)
    assert np.array_equal(most, topk)
    row = table[(table["blocks"] == "3/6/9") & (table["order"] == "most")].iloc[0]
    assert row["top-1 %"] == 100 * topk.mean()
    assert table.iloc[0]["top-1 %"] == 100 * correct_per_image(model, images, labels, 32).mean()


def test_most_and_least_keep_the_two_halves_of_the_patches(digits):
    model, images, _ = digits
    kept = {}
    for order in ("most", "least"):
        reduced = TokenReducedViT(model, {3: ClassAttentionOrder(0.5, order, torch.Generator())})
        [(block, source)] = reduced.trace(images[:8])
        kept[order] = (source > 0).any(1)  # [images, 64 patches]
    assert block == 3
    assert kept["most"].sum(1).tolist() == [32] * 8
    assert not (kept["most"] & kept["least"]).any() and (kept["most"] | kept["least"]).all()


def test_the_random_order_is_seeded_and_differences_are_against_it(digits, table):
    model, images, labels = digits
    first, again = (probe(model, images[:8], labels[:8], keep=0.5, seed=3) for _ in range(2))
    assert first.equals(again)
    most = table[table["order"] == "most"].set_index("blocks")
    random = table[table["order"] == "random"].set_index("blocks")
    assert np.allclose(most["minus random"], most["top-1 %"] - random["top-1 %"])
    assert (most["95% low"] <= most["minus random"]).all() and (most["minus random"] <= most["95% high"]).all()


class LeftHalf(KeepRateReducer):
    def score(self, x, state, info):
        return -torch.arange(x.shape[1] - state.prefix).remainder(8).float().expand(x.shape[0], -1)


def test_the_gap_is_the_mean_distance_to_the_nearest_kept_patch(tiny_vit, digit_images):
    """Keeping the left four columns of the 8x8 grid: the right columns are 1, 2, 3, 4 patches from a kept one."""
    one_stage = nearest_kept_gap(tiny_vit, {3: LeftHalf(0.5)}, digit_images, 2)
    assert one_stage == (1 + 2 + 3 + 4) * 8 / 64
    assert nearest_kept_gap(tiny_vit, {3: LeftHalf(0.5), 6: LeftHalf(0.5)}, digit_images, 2) > one_stage  # the last
    assert nearest_kept_gap(tiny_vit, {}, digit_images, 2) == 0.0


def test_a_keep_rate_that_reduces_nothing_is_refused(capsys):
    assert main(["class-attention", "--keep", "1"]) == 2
    assert "--keep 1.0: must be between 0 and 1" in capsys.readouterr().err


def test_the_spread_order_keeps_the_top_two_of_every_window(tiny_vit, digit_images):
    scores = torch.rand(3, 64)
    rank = rank_in_window(scores, (8, 8))
    window = scores.reshape(3, 4, 2, 4, 2)[:, 1, :, 2, :].reshape(3, 4)  # rows 2-3, columns 4-5
    window_rank = rank.reshape(3, 4, 2, 4, 2)[:, 1, :, 2, :].reshape(3, 4)
    assert torch.equal(window_rank, window.argsort(-1, descending=True).argsort(-1).float())
    reduced = TokenReducedViT(tiny_vit, {3: ClassAttentionOrder(0.5, "spread", torch.Generator(), (8, 8))})
    kept = (reduced.trace(digit_images)[0][1] > 0).any(1).reshape(4, 4, 2, 4, 2)
    assert (kept.sum((2, 4)) == 2).all()  # two of each 2x2 window
    with pytest.raises(ValueError, match="first reduction only"):
        rank_in_window(torch.rand(1, 32), (8, 8))
