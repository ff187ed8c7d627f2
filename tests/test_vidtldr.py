"""vid-TLDR against its official rules, written out per image: saliency from the attention rows without the
size bias (background 0, foreground sharpened into [0, 1]), ToMe's matching on the block's output tokens,
sources weighted by saliency x size, sizes summed with the same weights, proportional attention after."""

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.ledger import measure_gmacs
from tokenbench.registry import get_method


def vidtldr_step(r, prefix, blocks=(0, 1, 2)):
    def reduce(i, x, attn, keys, values, size):
        if i not in blocks:
            return x, size
        n = x.shape[1]
        r_now = min(int(n * r) if r < 1 else int(r), (n - prefix) // 2)
        if r_now <= 0:
            return x, size
        rows = attn[0, :, prefix:, prefix:].mean(0)
        e = torch.stack([(row * row.log()).sum() for row in rows])
        e = (e - e.min()) / (e - e.min()).max()
        background = e < e.mean()
        e = e - e.mean()
        e = e / e.max()
        e[background] = 0.0
        e = torch.cat([torch.zeros(prefix, dtype=e.dtype), e])  # the class token is never a source
        metric = x[0] / x[0].norm(dim=-1, keepdim=True)
        a, b = metric[::2], metric[1::2]
        scores = (a @ b.T + 1) / 2
        if prefix:
            scores[0] = -torch.inf
        best, partner = scores.max(dim=-1)
        order = best.argsort(descending=True)
        merged, unmerged = order[:r_now], order[r_now:].sort().values
        x_a, x_b = x[0, ::2], x[0, 1::2]
        s_a, s_b = size[0, ::2, 0], size[0, 1::2, 0]
        total, weights = x_b * s_b[:, None], s_b.clone()
        for j in merged.tolist():
            w = e[2 * j] * s_a[j]
            total[partner[j]] += w * x_a[j]
            weights[partner[j]] += w
        new_x = torch.cat([x_a[unmerged], total / weights[:, None]])
        new_size = torch.cat([s_a[unmerged], weights])
        return new_x[None], new_size[None, :, None]

    return reduce


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("r", [0.2, 3, 0.5])
def test_logits_equal_the_written_out_algorithm(class_token, r):
    kwargs = {} if class_token else {"class_token": False, "global_pool": "avg"}
    vit = small_vit("deit_small_patch16_224", **kwargs)  # 17 or 16 tokens
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("vidtldr").build(vit, r=r)(images)
        slow = torch.cat([plain_logits(vit, img[None], vidtldr_step(r, int(class_token)), plain_attention=True)
                          for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_deit_small_schedule():
    """r = 0.2 of the current tokens in blocks 0-2: 197 -> 158 -> 127 -> 102 (int(197 x 0.2) = 39, ...)."""
    ledger = measure_gmacs(get_method("vidtldr").build(deit_small(), r=0.2), torch.randn(1, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [197, 158, 127] + [102] * 9
