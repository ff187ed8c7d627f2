"""GTP-ViT against the official rules of `models_v3.py`, written out per image: the Mixed graph of the
embedded tokens (grid neighbours or semantic neighbours), normalised D^-1/2 A D^-1/2; after every block's
attention: MixedAttnMax ranking, the r lowest removed, alpha x graph-weighted sums added to the kept tokens
and to their sizes (token_scale), the graph restricted to the kept tokens."""

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.methods.gtp import grid_graph, token_graph
from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


def test_cases_worked_by_hand():
    """On a 2 x 2 grid every patch touches the other three; on a 1 x 3 grid the middle one touches both ends.
    Three tokens whose only links are spatial (no semantic neighbour asked for) in a row: degrees 1, 2, 1,
    so the normalised edge weights are 1 / sqrt(1 x 2)."""
    assert grid_graph(2, 2, "cpu").tolist() == [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]
    assert grid_graph(1, 3, "cpu").tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    graph = token_graph(tokens, n_tokens=4, neighbours=0, grid=(1, 3))
    w = 2 ** -0.5
    torch.testing.assert_close(graph[0], torch.tensor([[0, w, 0], [w, 0, w], [0, w, 0]], dtype=torch.float64))


def official_graph(tokens, n_tokens, neighbours, side):
    """The official Mixed graph of one image's [P, C] patch tokens, element by element."""
    p = len(tokens)
    normed = tokens / tokens.norm(dim=-1, keepdim=True)
    cos = normed @ normed.T
    graph = torch.zeros(p, p, dtype=tokens.dtype)
    for i in range(p):
        threshold = sorted(cos[i].tolist())[n_tokens - 1 - neighbours - 1]  # the kth smallest, k 1-based
        for j in range(p):
            semantic = (1 if cos[i, j] >= threshold else 0) - (1 if i == j else 0)
            spatial = int(abs(i // side - j // side) <= 1 and abs(i % side - j % side) <= 1 and i != j)
            graph[i, j] = float(semantic | spatial)
    degree = graph.sum(-1)
    return graph / degree.sqrt()[:, None] / degree.sqrt()[None, :]


def gtp_step(vit, image, r, alpha, neighbours):
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))
    side = vit.patch_embed.grid_size[0]
    graph = [official_graph(x[0, 1:], x.shape[1], neighbours, side)]

    def reduce(i, x, attn, keys, values, size):
        n = x.shape[1] - 1
        self_attention = torch.diagonal(attn[0], dim1=-2, dim2=-1)[:, 1:].max(dim=0).values
        received = attn[0, :, :, 1:].sum(dim=-2).max(dim=0).values
        rank = torch.argsort(self_attention * received, descending=True).tolist()
        cut = min(r, n - 1)
        kept, gone = rank[:n - cut], rank[n - cut:]
        g = graph[0]
        tokens, sizes = [x[0, 0]], [size[0, 0]]
        for k in kept:
            tokens.append(x[0, 1 + k] + alpha * sum(g[k, m] * x[0, 1 + m] for m in gone))
            sizes.append(size[0, 1 + k] + alpha * sum(g[k, m] * size[0, 1 + m] for m in gone))
        graph[0] = g[kept][:, kept]
        return torch.stack(tokens)[None], torch.stack(sizes)[None]

    return reduce


@pytest.mark.parametrize("r, alpha, neighbours", [(1, 0.1, 8), (2, 0.4, 3), (3, 0.1, 0)])
def test_logits_equal_the_written_out_algorithm(r, alpha, neighbours):
    vit = small_vit("deit_small_patch16_224")  # 17 tokens: 16 patches on a 4 x 4 grid
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("gtp").build(vit, r=r, alpha=alpha, neighbours=neighbours)(images)
        slow = torch.cat([plain_logits(vit, img[None], reduce=gtp_step(vit, img[None], r, alpha, neighbours))
                          for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)


def test_deit_small_schedule():
    """r = 8 (the README's DeiT-B row 8): 196, 188, ..., 108 patch tokens enter blocks 0-11."""
    ledger = measure_gmacs(get_method("gtp").build(deit_small(), r=8), torch.randn(1, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [197 - 8 * i for i in range(12)]


def test_the_trace_keeps_each_kept_token_s_own_patch():
    """A propagated patch spreads over several neighbours, so it is held by none; each kept token holds its own.
    16 patches, r = 2 in each of 12 blocks: r is capped so that one patch token remains."""
    vit = small_vit("deit_small_patch16_224")
    stages = get_method("gtp").build(vit, r=2).trace(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert [source.shape[1] for _, source in stages] == [15, 13, 11, 9, 7, 5, 3, 2]  # at least one patch stays
    for _, source in stages:
        assert ((source > 0).sum(dim=2)[0, 1:] == 1).all() and ((source > 0).sum(dim=1) <= 1).all()
