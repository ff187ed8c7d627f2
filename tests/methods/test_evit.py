"""EViT against its paper: token schedule, GMACs, the fused token, any timm ViT."""

import math

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method

ARCHITECTURES = [
    ("deit_small_patch16_224", {}),  # plain, class token
    ("deit3_small_patch16_224", {}),  # LayerScale, no position embedding on the class token
    ("vit_small_patch16_224", {"qk_norm": True}),
]


def evit_step(keep, class_token=True, blocks=(3, 6, 9)):
    """EViT's reduction for one image, written out: top ceil(k(N-1)) by head-mean class attention,
    the rest summed with their raw attention weights into one token appended last. Without a class
    token: all N tokens, ranked by the mean attention they receive."""

    def reduce(i, x, attn, keys, values, size):
        if i not in blocks:
            return x, size
        p = int(class_token)
        patches = x[0, p:]
        received = attn[0, :, 0] if class_token else attn[0].mean(dim=1)
        score = received[:, p:].mean(dim=0)
        kept = score.topk(math.ceil(keep * len(patches))).indices.tolist()
        dropped = [j for j in range(len(patches)) if j not in kept]
        fused = sum(score[j] * patches[j] for j in dropped)
        x = torch.cat([x[0, :p], patches[kept], fused[None]])[None]
        return x, torch.ones_like(x[..., :1])

    return reduce


def test_keep_07_schedule_includes_the_fused_token():
    ledger = measure_gmacs(get_method("evit").build(deit_small(), keep=0.7), torch.randn(2, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2


def test_gmacs_match_the_paper_and_the_flop_counter():
    x = torch.randn(1, 3, 224, 224)
    gmacs = {}
    for keep in (0.9, 0.8, 0.7, 0.6, 0.5):
        model = get_method("evit").build(deit_small(), keep=keep)
        gmacs[keep] = round(measure_gmacs(model, x).gmacs.item(), 1)
    assert gmacs == {0.9: 4.0, 0.8: 3.5, 0.7: 3.0, 0.6: 2.6, 0.5: 2.3}
    # The ledger counts every matmul the method runs (the class-attention row, the fusion).
    assert measure_gmacs(model, x).matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)


@pytest.mark.parametrize("name,kwargs", ARCHITECTURES)
def test_logits_equal_the_written_out_algorithm(name, kwargs):
    vit = small_vit(name, **kwargs)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("evit").build(vit, keep=0.7)(images)
        slow = torch.cat([plain_logits(vit, img[None], evit_step(0.7)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_fused_token_is_traced_as_merged():
    model = get_method("evit").build(deit_small(), keep=0.5)
    stages = model.trace(torch.randn(1, 3, 224, 224))
    assert [(block, s.shape[1]) for block, s in stages] == [(3, 100), (6, 52), (9, 28)]
    for _, source in stages:
        assert ((source[0] > 0).sum(0) == 1).all()  # every patch is in exactly one token: kept or fused
        assert (source[0, -1] > 0).sum().item() > 1  # the last token is the fused one
    first = stages[0][1][0]
    assert torch.equal(first[1:-1].sum(1), torch.ones(98))  # kept tokens hold their own patch whole
    fused = first[-1][first[-1] > 0]  # the fused token holds the 98 dropped patches with its fusion weights
    assert len(fused) == 98 and (fused < 1).all() and fused.sum() <= 1 + 1e-6


def test_without_a_class_token_the_mean_attention_received_stands_in():
    vit = small_vit("vit_small_patch16_224", class_token=False, global_pool="avg")
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model = get_method("evit").build(vit, keep=0.7)
    assert model.cls_substitute == "mean attention received"
    with torch.inference_mode():
        fast = model(images)
        slow = torch.cat([plain_logits(vit, img[None], evit_step(0.7, class_token=False)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_noop_equals_dense():
    vit = small_vit("vit_small_patch16_224")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(get_method("evit").build(vit, keep=1.0)(x), vit(x))
