"""ATS against its paper: significance, inverse transform sampling, per-image counts, padding, GMACs."""

import copy
import math

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

import tokenbench.methods.ats
from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method


def peaky_vit(name="deit_small_patch16_224", **kwargs):
    """A narrow test ViT with sharper attention, so that images keep visibly different numbers of tokens
    (LayerScale gammas at 1: some timm versions initialise them near 0, leaving every block a no-op)."""
    vit = copy.deepcopy(small_vit(name, **kwargs))
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(6)
            for scale in (blk.ls1, blk.ls2):
                if hasattr(scale, "gamma"):
                    scale.gamma.fill_(1.0)
    return vit


def ats_step(samples, class_token=True, first_block=3):
    """ATS for one image, written out as in the paper: significance = class attention summed over heads
    times the value norm; ascending sort, min-max normalised cdf, `samples` levels from its smallest
    non-zero value to 1, nearest cdf point per level, repeated picks kept once."""

    def reduce(i, x, attn, keys, values, size):
        if i < first_block:
            return x, size
        p, n = int(class_token), x.shape[1]
        received = attn[0, :, 0] if class_token else attn[0].mean(dim=1)
        value_norm = values[0].transpose(0, 1).reshape(n, -1).norm(dim=-1)
        score = (received.sum(dim=0) * value_norm)[p:]
        sorted_score, order = (score / score.sum()).sort()
        cdf = sorted_score.cumsum(dim=0)
        if len(cdf) == 1:  # a last patch token is always kept
            picks = torch.zeros(1, dtype=torch.long)
        else:
            cdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
            levels = torch.linspace(cdf[cdf > 0].min().item(), 1.0, samples, dtype=cdf.dtype)
            picks = (levels[:, None] - cdf[None, :]).abs().argmin(dim=1).unique()
        x = torch.cat([x[0, :p], x[0, p + order[picks]]])[None]
        return x, torch.ones_like(x[..., :1])

    return reduce


def test_official_placement_and_sample_count():
    model = get_method("ats").build(deit_small(), sample_rate=1.0)
    assert [blk.reducer is not None for blk in model.blocks] == [False] * 3 + [True] * 9
    assert model.blocks[3].reducer.samples == 196  # n_ref_tokens - 1 in the official DeiT-S config
    assert get_method("ats").build(deit_small(), sample_rate=0.5).blocks[3].reducer.samples == 98


@pytest.mark.parametrize("name,kwargs", [
    ("deit_small_patch16_224", {}),
    ("deit3_small_patch16_224", {}),  # LayerScale
    ("vit_small_patch16_224", {"qk_norm": True}),
])
@pytest.mark.parametrize("keep", [1.0, 0.7])
def test_batched_logits_equal_the_written_out_algorithm_per_image(name, kwargs, keep):
    vit = peaky_vit(name, **kwargs)
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = get_method("ats").build(vit, sample_rate=keep)
    ledger = measure_gmacs(model, images)
    assert len(set(map(tuple, ledger.tokens_per_block().tolist()))) > 1  # counts differ: the batch is padded
    with torch.inference_mode():
        fast = model(images)
        slow = torch.cat([plain_logits(vit, img[None], ats_step(math.ceil(keep * 16))) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_padding_never_changes_an_image_or_its_gmacs():
    vit = peaky_vit()
    images = torch.randn(6, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = get_method("ats").build(vit, sample_rate=1.0)
    batch = measure_gmacs(model, images)
    with torch.inference_mode():
        together = model(images)
    for i, image in enumerate(images):
        alone = measure_gmacs(model, image[None])
        with torch.inference_mode():
            torch.testing.assert_close(model(image[None]), together[i:i + 1], rtol=0, atol=1e-10)
        assert torch.equal(alone.tokens_per_block()[0], batch.tokens_per_block()[i])
        assert alone.macs.item() == batch.macs[i].item()  # each image's own count, never the padded one


def test_ledger_matmuls_equal_the_flop_counter():
    model = get_method("ats").build(deit_small(), sample_rate=1.0)
    x = torch.randn(1, 3, 224, 224)
    assert measure_gmacs(model, x).matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)


def test_every_token_sampled_reproduces_the_dense_logits(monkeypatch):
    """At the largest K with no repeated picks ATS keeps every token: only the machinery remains
    (query-subset attention, reordering by significance, masks), and it must be exact."""
    def every_position(cdf, levels):
        return torch.arange(cdf.shape[1]).expand(cdf.shape[0], -1)

    monkeypatch.setattr(tokenbench.methods.ats, "nearest_points", every_position)
    vit = peaky_vit("deit3_small_patch16_224")
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = get_method("ats").build(vit, sample_rate=1.0)
    assert (measure_gmacs(model, images).tokens_per_block() == 17).all()
    with torch.inference_mode():
        torch.testing.assert_close(model(images), vit(images), rtol=0, atol=1e-10)


def test_without_a_class_token_the_mean_attention_received_stands_in():
    vit = peaky_vit("vit_small_patch16_224", class_token=False, global_pool="avg")
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = get_method("ats").build(vit, sample_rate=1.0)
    assert model.cls_substitute == "mean attention received"
    with torch.inference_mode():
        fast = model(images)
        slow = torch.cat([plain_logits(vit, img[None], ats_step(16, class_token=False)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)
