"""ToMe against its paper: r schedules, GMACs, merging and proportional attention, any timm ViT."""

import pytest
import timm
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit, without_weights  # noqa: F401  (one_thread: autouse)

from tokenbench.methods.tome import merge_schedule
from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method


def tome_step(r, protected):
    """ToMe's merge for one image, written out as in the paper: alternate A/B split, cosine similarity
    of head-mean keys, protected tokens never merged, size-weighted average, sizes summed."""

    def reduce(i, x, attn, keys, values, size):
        r_now = min(r, (x.shape[1] - protected) // 2)
        if r_now <= 0:
            return x, size
        metric = keys[0].mean(dim=0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[::2], metric[1::2]
        scores = a @ b.T
        if protected:
            scores[0] = -torch.inf  # the class token (A[0]) is never merged
        best, partner = scores.max(dim=-1)
        order = best.argsort(descending=True)
        merged, unmerged = order[:r_now], order[r_now:]
        if protected:
            unmerged = unmerged.sort().values

        def merge(t):
            t_a, t_b = t[0, ::2], t[0, 1::2].clone()
            for j in merged.tolist():
                t_b[partner[j]] += t_a[j]
            return torch.cat([t_a[unmerged], t_b])[None]

        new_size = merge(size)
        return merge(x * size) / new_size, new_size

    return reduce


def test_decreasing_schedule_is_tomes():
    assert merge_schedule(16, -1.0, 12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert merge_schedule(13, 0.0, 12) == [13] * 12


@pytest.mark.parametrize("name,r,gmacs", [
    ("deit_small_patch16_224", 13, 2.71),
    ("vit_base_patch16_224", 13, 10.38),
    ("vit_base_patch16_224", 16, 8.78),
])
def test_gmacs_match_the_paper(name, r, gmacs):
    if name == "deit_small_patch16_224":
        vit = deit_small()
    else:  # token counts do not depend on the weights: skip timm's slow initialisation
        vit = without_weights(lambda: timm.create_model(name)).to_empty(device="cpu").eval()
        for param in vit.parameters():
            param.data.normal_(std=0.02)
    ledger = measure_gmacs(get_method("tome").build(vit, r=r), torch.randn(1, 3, 224, 224))
    assert round(ledger.gmacs.item(), 2) == gmacs
    assert ledger.tokens_per_block()[0].tolist() == [197 - r * i for i in range(12)]


def test_ledger_counts_the_matching_matmul():
    model = get_method("tome").build(deit_small(), r=13)
    x = torch.randn(1, 3, 224, 224)
    assert measure_gmacs(model, x).matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)


@pytest.mark.parametrize("name,kwargs", [
    ("deit_small_patch16_224", {}),
    ("deit3_small_patch16_224", {}),  # LayerScale
    ("vit_small_patch16_224", {"qk_norm": True}),
    ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),  # nothing protected, sized pooling
])
def test_logits_equal_the_written_out_algorithm(name, kwargs):
    vit = small_vit(name, **kwargs)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    protected = vit.num_prefix_tokens
    with torch.inference_mode():
        fast = get_method("tome").build(vit, r=3)(images)
        slow = torch.cat([plain_logits(vit, img[None], tome_step(3, protected)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_sizes_sum_to_the_patches_and_prefix_tokens_stay_first():
    vit = small_vit("vit_small_patch16_224", reg_tokens=2)  # class token + 2 registers
    model = get_method("tome").build(vit, r=2)
    stages = model.trace(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert [block for block, _ in stages] == list(range(12))[:len(stages)] and len(stages) >= 3
    source = stages[-1][1]
    assert source[:, :3].sum() == 0  # prefix never merged
    assert (source[:, 3:].sum(-1) >= 1).all() and source[:, 3:].sum(-1).max() > 1  # merged tokens hold several
    assert torch.equal(source.sum(1), torch.ones(2, 16, dtype=torch.float64))  # every patch held exactly once


def test_noop_equals_dense():
    vit = small_vit("deit3_small_patch16_224")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(get_method("tome").build(vit, r=0)(x), vit(x))
