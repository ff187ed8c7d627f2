"""A plain ViT forward for the method tests: one image, full attention maps, nothing clever.

Each method test writes the paper's reduction step against this (loops and all) and checks that the
fast batched implementation gives the same logits.
"""

import functools

import pytest
import timm
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models gain nothing from threads, and lose much when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def without_weights(create):
    """`create()` on the meta device (shapes only, no slow initialisation), or on the CPU with a timm too
    old to build there (nox -s tests_oldest)."""
    try:
        with torch.device("meta"):
            return create()
    except (RuntimeError, TypeError):
        return create()


def small_vit(name: str, **kwargs):
    """A seeded float64 timm ViT of architecture `name`, narrowed (dim 96, 3 heads) at 64x64 (17 tokens).

    LayerScale factors are drawn around 1 (timm initialises them to 1e-6, which would hide the blocks).
    """
    torch.manual_seed(0)
    vit = timm.create_model(name, **{"img_size": 64, "embed_dim": 96, "num_heads": 3, **kwargs}).eval().double()
    for module in vit.modules():
        if isinstance(module, timm.layers.LayerScale):
            module.gamma.data.uniform_(0.5, 1.5)
    return vit


@functools.cache
def deit_small():
    """Random-init DeiT-S at 224 (weights do not matter for token counts and GMACs of fixed-rate methods)."""
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224").eval()


def plain_logits(vit, image, reduce=None, proportional=True, after=None, plain_attention=False):
    """Logits of one image [1, 3, H, W] through timm's modules with explicit attention.

    `reduce(i, x, attn, keys, values, size)` runs after block i's attention residual and returns the new
    (x, size); `after(i, x, attn, keys)` runs after block i's MLP and returns the new x; with
    `plain_attention` both get the softmax map without the size bias; `size` [1, N, 1] starts at ones and, if `proportional`, adds log(size) to the attention
    logits (proportional attention; a no-op while every size is 1).
    """
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))
    size = torch.ones_like(x[..., :1])
    for i, blk in enumerate(vit.blocks):
        attn_layer = blk.attn
        h = blk.norm1(x)
        _, n, c = h.shape
        q, k, v = attn_layer.qkv(h).reshape(1, n, 3, attn_layer.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn_layer.q_norm(q), attn_layer.k_norm(k)
        logits = q @ k.transpose(-2, -1) * attn_layer.scale
        plain = logits.softmax(dim=-1)
        if proportional:
            logits = logits + size[..., 0].log()[:, None, None, :]
        attn = logits.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(1, n, c)
        if plain_attention:
            attn = plain
        x = x + blk.ls1(attn_layer.proj(attn_layer.norm(out)))
        if reduce is not None:
            x, size = reduce(i, x, attn, k, v, size)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        if after is not None:
            x = after(i, x, attn, k)
    x = vit.norm(x)
    if vit.global_pool == "token":
        pooled = x[:, 0]
    else:
        p = vit.num_prefix_tokens
        pooled = (x[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)
    return vit.head(vit.fc_norm(pooled))
