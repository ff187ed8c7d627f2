"""vid-TLDR against its official rules, written out per image: saliency from the full attention rows without
the size bias, normalised over all tokens (background 0, foreground sharpened into [0, 1]), ToMe's matching
on the block's output tokens (the class token never merged), sources weighted by saliency x size, sizes
summed with the same weights, proportional attention after; the source trace weighted the same way."""

import math

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.methods.vidtldr import saliency
from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


def vidtldr_step(r, prefix, blocks=(0, 1, 2)):
    def reduce(i, x, attn, keys, values, size):
        if i not in blocks:
            return x, size
        n = x.shape[1]
        r_now = min(int(n * r) if r < 1 else int(r), (n - prefix) // 2)
        if r_now <= 0:
            return x, size
        rows = attn[0].mean(0)  # every token's full row, the class token's column included
        e = torch.stack([(row * row.log()).sum() for row in rows])  # normalised over all tokens, as official
        e = (e - e.min()) / (e - e.min()).max()
        background = e < e.mean()
        e = e - e.mean()
        e = e / e.max()
        e[background] = 0.0
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


def test_saliency_reads_full_rows_with_the_class_token_column_by_hand():
    """One head, tokens [cls, p1, p2, p3]; p1 sends half its attention to the class token. Over the full rows,
    normalised over all four tokens (the official rule), p1 falls below the mean: background. Over the patch
    columns and rows alone (tokenbench's earlier rule) it was foreground."""
    rows = torch.tensor([[0.25, 0.25, 0.25, 0.25],
                         [0.50, 1 / 6, 1 / 6, 1 / 6],
                         [0.10, 0.30, 0.30, 0.30],
                         [0.10, 0.10, 0.10, 0.70]], dtype=torch.float64)
    plogp = lambda *a: sum(v * math.log(v) for v in a)  # noqa: E731
    raw = [plogp(0.25, 0.25, 0.25, 0.25), plogp(0.5, 1 / 6, 1 / 6, 1 / 6), plogp(0.1, 0.3, 0.3, 0.3),
           plogp(0.1, 0.1, 0.1, 0.7)]  # -1.3863, -1.2425, -1.3138, -0.9397
    low, high = min(raw), max(raw)
    unit = [(v - low) / (high - low) for v in raw]  # 0, 0.3220, 0.1624, 1
    mean = sum(unit) / 4  # 0.3711: p1 (0.3220) is below it, so background with this class token too
    top = max(u - mean for u in unit)
    expected = [0.0 if u < mean else (u - mean) / top for u in unit]
    assert expected[1] == 0.0 and expected[3] == 1.0
    got = saliency(rows[None, None])[0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    patch_only = saliency(rows[None, None, 1:, 1:])[0]  # the old rule (patch columns, patch rows)
    assert patch_only[0] > 0  # p1 was foreground there: the two rules disagree on this map


def test_the_source_trace_is_weighted_by_saliency():
    """After block 0 each patch is held whole by a kept or destination token, or with its saliency by the
    token it merged into: background patches are held by none, as in the official `source_trace`."""
    vit = small_vit("deit_small_patch16_224")  # 17 tokens
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    block, source = get_method("vidtldr").build(vit, r=0.5).trace(images)[0]
    assert block == 0 and source.shape == (1, 17 - 8, 16)
    attn = vit.blocks[0].attn
    with torch.inference_mode():
        x = vit.blocks[0].norm1(vit.norm_pre(vit._pos_embed(vit.patch_embed(images))))
        q, k, _ = attn.qkv(x).reshape(1, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        weights = (q * attn.scale @ k.transpose(-1, -2)).softmax(dim=-1)
    patch_saliency = saliency(weights)[0, 1:]
    held = source[0].sum(0)
    assert ((source[0] > 0).sum(0) <= 1).all()  # no patch is held twice
    whole = held == 1
    assert whole.sum() >= 8  # the 8 tokens that were not merged away hold their patches whole
    torch.testing.assert_close(held[~whole], patch_saliency[~whole], rtol=0, atol=1e-12)
    assert (held == 0).any()  # a background source's patch is held by no token
