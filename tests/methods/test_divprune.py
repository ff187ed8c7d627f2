"""DivPrune against its official rule, written out per image: distances 1 - cosine, the first token the one
whose nearest other token is farthest, then each next the farthest from everything chosen (lowest index on
ties), int(round(keep x patches)) tokens kept in their original order, once, after block 3's MLP."""

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.methods.divprune import max_min_diverse
from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


def test_a_case_worked_by_hand():
    """(1, 0), (1, .1), (0, 1), (-1, 0): nearest-other distances .005, .005, .9005, 1, so (-1, 0) comes first;
    then (1, 0) at distance 2 from it; then (0, 1), whose distance to both chosen is 1 (against .005)."""
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    assert max_min_diverse(tokens, 3).tolist() == [[3, 0, 2]]
    assert max_min_diverse(tokens, 1).tolist() == [[3]]


def official_choice(features, count):
    """The official greedy selection for one image's [n, d] features, written with lists."""
    normed = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - normed @ normed.T
    n = len(features)
    chosen = []
    for i in range(count):
        if i == 0:
            scores = [sorted(distance[:, j].tolist())[1] for j in range(n)]
        else:
            scores = [min(float(distance[s, j]) for s in chosen) for j in range(n)]
        chosen.append(scores.index(max(scores)))
    return chosen


def divprune_step(keep, block=2):
    def after(i, x, attn, keys):
        if i != block:
            return x
        patches = x.shape[1] - 1
        kept = sorted(official_choice(x[0, 1:], int(round(keep * patches))))
        return torch.cat([x[:, :1], x[:, [1 + j for j in kept]]], dim=1)

    return after


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.3, 0.15])
def test_logits_equal_the_written_out_algorithm(keep):
    vit = small_vit("deit_small_patch16_224")  # 17 tokens: 16 patches
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("divprune").build(vit, keep=keep)(images)
        slow = torch.cat([plain_logits(vit, img[None], proportional=False, after=divprune_step(keep))
                          for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)


def test_deit_small_schedule():
    """keep 0.5 of 196 patches: 98 + the class token from block 3 on."""
    ledger = measure_gmacs(get_method("divprune").build(deit_small(), keep=0.5), torch.randn(1, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [197] * 3 + [99] * 9
