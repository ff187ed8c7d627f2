"""MCTF against its official code's evaluation path, written out for one image: two-step (bidirectional)
merging with scatter-adds, attention x size pooling, the attention map merged one step ahead."""

import pytest
import torch
from plain_vit import deit_small, one_thread, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method


def two_step_merge(t, unm, src, dst, unm2, src2, dst2):
    """The official merge along dim -2: A = even rows, B = odd rows; A sources scatter-add into B, then
    B sources into the remaining A; output [remaining A, B that stayed]."""
    a, b = t[..., ::2, :], t[..., 1::2, :]
    rest = a[..., unm, :]
    b = b.index_add(-2, dst, a[..., src, :])
    return torch.cat([rest.index_add(-2, dst2, b[..., src2, :]), b[..., unm2, :]], dim=-2)


def mctf_logits(vit, image, r):
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))[0]
    size = torch.ones(x.shape[0], 1, dtype=x.dtype)
    for i, blk in enumerate(vit.blocks):
        layer = blk.attn
        n, c = x.shape
        q, k, v = layer.qkv(blk.norm1(x)).reshape(n, 3, layer.num_heads, -1).permute(1, 2, 0, 3)
        attn = (q @ k.transpose(-2, -1) * layer.scale + size[:, 0].log()).softmax(dim=-1)
        r_now = min(r if n - r >= 10 else n - 10, (n - 1) // 2)
        if i > 0 and r_now > 0:
            first, second = r_now // 2, r_now - r_now // 2
            m = x / x.norm(dim=-1, keepdim=True)
            scores = (m[::2] @ m[1::2].T + 1) / 2
            u = 1 / attn.mean(dim=(0, 1))
            u = u / u.max()
            scores = scores * (u[::2, None] * u[None, 1::2]) ** (1 / 20)
            if i > 1:  # sizes exist after the first merge
                s = 1 / size[:, 0]
                s = s / s.max()
                scores = scores * (s[::2, None] * s[None, 1::2]) ** (1 / 40)
            scores[0] = -torch.inf
            best, partner = scores.max(dim=-1)
            ranked = best.argsort(descending=True)
            src, unm = ranked[:first], ranked[first:].sort().values
            best2, partner2 = scores[unm].T.max(dim=-1)
            ranked2 = best2.sort(descending=True).indices
            merge = lambda t: two_step_merge(t, unm, src, partner[src], ranked2[second:], ranked2[:second],  # noqa: E731
                                             partner2[ranked2[:second]])
            w = attn.mean(dim=(0, 1))[:, None] * size / size.max()
            norm = merge(w)
            attn = merge(attn[..., None])[..., 0]  # keys summed
            attn = merge((attn * w[None]).transpose(-1, -2)[..., None])[..., 0].transpose(-1, -2) / norm[None]
            x, size = merge(x * w) / norm, merge(size)
            n = x.shape[0]
            v = layer.qkv(blk.norm1(x)).reshape(n, 3, layer.num_heads, -1).permute(1, 2, 0, 3)[2]
        x = x + blk.ls1(layer.proj((attn @ v).transpose(0, 1).reshape(n, c)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return vit.head(vit.fc_norm(vit.norm(x)[:1]))


@pytest.mark.parametrize("r", [2, 3])
def test_logits_equal_the_written_out_algorithm(r):
    vit = small_vit("deit_small_patch16_224", img_size=96)  # 37 tokens: merges run in many blocks
    images = torch.randn(3, 3, 96, 96, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("mctf").build(vit, r=r)(images)
        slow = torch.cat([mctf_logits(vit, img[None], r) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_deit_small_r16_schedule_and_the_readmes_gmacs():
    """The official README's DeiT-S figure, 2.60 GMACs at r = 16 (blocks 1-11), with the same counting:
    LN1 and Q, K on the tokens before each merge, the rest after; 197, 181, ..., 21 tokens."""
    model = get_method("mctf").build(deit_small(), r=16)
    x = torch.randn(1, 3, 224, 224)
    ledger = measure_gmacs(model, x)
    assert round(ledger.gmacs.item(), 2) == 2.60
    assert ledger.tokens_per_block()[0].tolist() == [197 - 16 * i for i in range(12)]
    assert ledger.matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)
