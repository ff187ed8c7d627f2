"""The clustering methods (K-Medoids, DPC-KNN, ATC) against their official code's rules, written out per image."""


import pytest
import torch
import torch.nn.functional as F
from plain_vit import deit_small, one_thread, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method
from tokenbench.reduce.schedules import stage_counts


def plain_blocks(vit, image, before=None, after=None):
    """One image through timm's modules with explicit attention; `before(i, x, previous_attn)` may replace
    the input of block i, `after(i, x, keys)` the tokens after its attention residual."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))
    attn = None
    for i, blk in enumerate(vit.blocks):
        if before is not None:
            x = before(i, x, attn)
        layer = blk.attn
        h = blk.norm1(x)
        _, n, c = h.shape
        q, k, v = layer.qkv(h).reshape(1, n, 3, layer.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * layer.scale).softmax(dim=-1)
        x = x + blk.ls1(layer.proj((attn @ v).transpose(1, 2).reshape(1, n, c)))
        if after is not None:
            x = after(i, x, k)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return vit.head(vit.fc_norm(vit.norm(x)[:, 0]))


def kmedoids_step(counts, blocks=(3, 6, 9)):
    def before(i, x, attn):
        if i not in blocks:
            return x
        k, patches = counts[blocks.index(i)], x[0, 1:]
        n = len(patches)
        w = attn[0].sum(0).sum(0)[1:]
        medoids = w.topk(k).indices.tolist()
        d = torch.cdist(patches[None], patches[None])[0]
        cost = [(d[j] * w[j]).sum() for j in range(n)]
        for _ in range(3):
            assign = [min(range(k), key=lambda c: (d[j, medoids[c]].item(), c)) for j in range(n)]
            medoids = [min([j for j in range(n) if assign[j] == c] or [0],
                           key=lambda j: (cost[j].item() if assign[j] == c else 1e6 * n, j)) for c in range(k)]
        return torch.cat([x[0, :1], patches[medoids]])[None]
    return before


def dpcknn_step(counts, blocks=(3, 6, 9)):
    def before(i, x, attn):
        if i not in blocks:
            return x
        k, patches = counts[blocks.index(i)], x[0, 1:]
        n, c = patches.shape
        d = torch.cdist(patches[None], patches[None])[0] / c ** 0.5
        density = torch.exp(-(d.sort(dim=-1).values[:, :5] ** 2).mean(-1))
        separation = torch.stack([min([d[j, m] for m in range(n) if density[m] > density[j]] or [d.max()])
                                  for j in range(n)])
        centres = (separation * density).topk(k).indices.tolist()
        groups = [[] for _ in range(k)]
        for j in range(n):
            c_j = centres.index(j) if j in centres else min(range(k), key=lambda c: (d[centres[c], j].item(), c))
            groups[c_j].append(patches[j])
        merged = [torch.stack(g).sum(0) / (len(g) + 1e-6) for g in groups]
        return torch.cat([x[0, :1], torch.stack(merged)])[None]
    return before


def atc_step(counts, linkage, blocks=(3, 6, 9)):
    """Clusters from scikit-learn's AgglomerativeClustering, as the official code makes them."""
    from sklearn.cluster import AgglomerativeClustering

    def after(i, x, keys):
        if i not in blocks:
            return x
        m = F.normalize(keys[0].mean(0), dim=-1)
        distance = (1 - m @ m.T)[1:, 1:].numpy()
        k = min(counts[blocks.index(i)], len(distance))
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage).fit(distance).labels_
        merged = [x[0, 1:][torch.from_numpy(labels == c)].mean(0) for c in range(k)]
        return torch.cat([x[0, :1], torch.stack(merged)])[None]
    return after


@pytest.mark.parametrize("name,keep,reference", [
    ("kmedoids", 0.7, lambda counts: dict(before=kmedoids_step(counts))),
    ("kmedoids", 0.4, lambda counts: dict(before=kmedoids_step(counts))),
    ("dpcknn", 0.7, lambda counts: dict(before=dpcknn_step(counts))),
    ("dpcknn", 0.4, lambda counts: dict(before=dpcknn_step(counts))),
    ("atc", 0.7, lambda counts: dict(after=atc_step(counts, "average"))),
    ("atc", 0.4, lambda counts: dict(after=atc_step(counts, "average"))),
])
def test_logits_equal_the_written_out_algorithm(name, keep, reference):
    vit = small_vit("deit_small_patch16_224")
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    counts = stage_counts(16, keep)
    with torch.inference_mode():
        fast = get_method(name).build(vit, keep=keep)(images)
        slow = torch.cat([plain_blocks(vit, img[None], **reference(counts)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


@pytest.mark.parametrize("linkage", ["complete", "single"])
def test_atc_linkages_cluster_as_scikit_learn(linkage):
    vit = small_vit("deit_small_patch16_224")
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    counts = stage_counts(16, 0.5)
    with torch.inference_mode():
        fast = get_method("atc").build(vit, keep=0.5, linkage=linkage)(images)
        slow = torch.cat([plain_blocks(vit, img[None], after=atc_step(counts, linkage)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name,first_reducing_block", [("kmedoids", 3), ("dpcknn", 3), ("atc", 4)])
def test_deit_small_schedule_at_keep_07(name, first_reducing_block):
    """int(196 * 0.7^s) patch clusters: 137, 96, 67 (+ the class token), before blocks 3/6/9 (K-Medoids,
    DPC-KNN) or after attention in them (ATC); the distances' matmul is charged as torch counts it."""
    assert stage_counts(196, 0.7) == [137, 96, 67] and stage_counts(196, 0.5) == [98, 49, 24]
    model = get_method(name).build(deit_small(), keep=0.7)
    x = torch.randn(1, 3, 224, 224)
    ledger = measure_gmacs(model, x)
    tokens = ledger.tokens_per_block()[0].tolist()
    start = first_reducing_block
    assert tokens[:start] == [197] * start and tokens[start:start + 3] == [138] * 3
    assert tokens[start + 3:start + 6] == [97] * 3 and tokens[start + 6:] == [68] * (12 - start - 6)
    assert ledger.matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)
