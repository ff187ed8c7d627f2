"""PPT against its official code's rules: per image, pool (ToMe) when the significance scores are flat, else
prune the least significant tokens; schedule and GMACs on DeiT-S."""

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)
from test_tome import tome_step

from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


def ppt_step(r, threshold, blocks=(3, 6, 9), seen=None):
    """One image, written out: significance = class attention summed over heads x value norm (all heads),
    normalised over the patches; variance below the threshold pools with ToMe's merge, else the r least
    significant tokens go and the rest stay in descending significance, class token first."""

    def reduce(i, x, attn, keys, values, size):
        if i not in blocks:
            return x, size
        n = x.shape[1]
        r_now = min(r, (n - 1) // 2)
        significance = attn[0, :, 0].sum(0) * values[0].transpose(0, 1).reshape(n, -1).norm(dim=-1)
        patches = significance[1:] / significance[1:].sum()
        pooled = patches.var() < threshold
        if seen is not None:
            seen.append(bool(pooled))
        if pooled:
            return tome_step(r_now, 1)(i, x, attn, keys, values, size)
        keep = torch.cat([torch.tensor([2.0], dtype=x.dtype), patches]).argsort(descending=True)[:n - r_now]
        return x[:, keep], size[:, keep]

    return reduce


@pytest.mark.parametrize("threshold", [0.0, 1.0, "median"])
def test_logits_equal_the_written_out_algorithm(threshold):
    vit = small_vit("deit_small_patch16_224", img_size=96)  # 37 tokens
    images = torch.randn(4, 3, 96, 96, dtype=torch.float64)
    if threshold == "median":  # a threshold between the images' variances: some pool, some prune
        seen_vars = []
        step = ppt_step(4, 0.0)
        with torch.inference_mode():
            for img in images:
                def spy(i, x, attn, keys, values, size):
                    if i == 3:
                        s = attn[0, :, 0].sum(0) * values[0].transpose(0, 1).reshape(x.shape[1], -1).norm(dim=-1)
                        seen_vars.append((s[1:] / s[1:].sum()).var().item())
                    return step(i, x, attn, keys, values, size)
                plain_logits(vit, img[None], spy)
        low, high = sorted(seen_vars)[1:3]
        threshold = (low + high) / 2  # between two images' variances, not on one
    seen = []
    with torch.inference_mode():
        fast = get_method("ppt").build(vit, r=4, threshold=threshold)(images)
        slow = torch.cat([plain_logits(vit, img[None], ppt_step(4, threshold, seen=seen)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)
    assert len(seen) == 12 and (any(seen) or threshold == 0.0) and (not all(seen) or threshold == 1.0)


def test_deit_small_r50_schedule_and_the_readmes_gmacs():
    """The README's off-the-shelf DeiT-S setting, r = 50 at blocks 3, 6, 9: 197 -> 147 -> 97 -> 49 tokens (the
    last step capped at (97 - 1) // 2 = 48); 2.944 GMACs by torchprofile, 2.947 by the analytic count."""
    ledger = measure_gmacs(get_method("ppt").build(deit_small(), r=50), torch.randn(1, 3, 224, 224))
    tokens = ledger.tokens_per_block()[0].tolist()
    assert tokens == [197] * 4 + [147] * 3 + [97] * 3 + [49] * 2
    assert round(ledger.gmacs.item(), 2) == 2.95
