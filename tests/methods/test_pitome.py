"""PiToMe against its official code's rules: energy order, matching then protected merging, token schedule."""

import math

import pytest
import torch
import torch.nn.functional as F
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method


def pitome_step(ratio, depth):
    """One image, written out: energy of each patch token from its cosine similarities (head-mean keys) to all
    patch tokens, margin 0.75 - 0.75 l / L; the first ceil(L/2) blocks match alternate halves of the energy
    order ToMe's way, later ones merge the 2r highest-energy tokens pairwise; size-weighted means."""

    def reduce(i, x, attn, keys, values, size):
        T = x.shape[1] - 1
        r = math.floor(T - T * ratio)
        if r <= 0:
            return x, size
        m = F.normalize(keys[0].mean(dim=0)[1:], dim=-1)
        sim = m @ m.T
        margin = 0.75 - 0.75 * i / depth
        energy = torch.stack([sum(F.elu(s - margin) for s in row) / T for row in sim])
        order = energy.argsort(descending=True)
        groups = {}  # destination patch -> the patches merged into it
        if i < math.ceil(depth / 2):
            a, b = order[::2], order[1::2]
            best = [max(range(len(b)), key=lambda j: (sim[a_i, b[j]].item(), -j)) for a_i in a.tolist()]
            value = torch.stack([sim[a[k], b[best[k]]] for k in range(len(a))])
            ranked = value.argsort(descending=True)
            for k in ranked[:r].tolist():
                groups.setdefault(b[best[k]].item(), []).append(a[k].item())
            keep = a[ranked[r:]].tolist() + b.tolist()
        else:
            a, b, protected = order[:2 * r:2], order[1:2 * r:2], order[2 * r:]
            for a_i in a.tolist():
                j = max(range(r), key=lambda j: (sim[a_i, b[j]].item(), -j))
                groups.setdefault(b[j].item(), []).append(a_i)
            keep = protected.tolist() + b.tolist()
        patches, sizes = x[0, 1:], size[0, 1:]
        new_x, new_size = [x[0, 0]], [size[0, 0]]
        for t in keep:
            members = [t] + groups.get(t, [])
            s = sum(sizes[j] for j in members)
            new_x.append(sum(patches[j] * sizes[j] for j in members) / s)
            new_size.append(s)
        return torch.stack(new_x)[None], torch.stack(new_size)[None]

    return reduce


@pytest.mark.parametrize("ratio", [0.9, 0.75])
def test_logits_equal_the_written_out_algorithm(ratio):
    vit = small_vit("deit_small_patch16_224")
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("pitome").build(vit, ratio=ratio)(images)
        slow = torch.cat([plain_logits(vit, img[None], pitome_step(ratio, 12), proportional=False) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ratio,after_each_block", [
    (0.9, [178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60]),
    (0.925, [183, 170, 158, 147, 137, 127, 118, 110, 102, 95, 88, 82]),
    (0.95, [188, 179, 171, 163, 155, 148, 141, 134, 128, 122, 116, 111]),
    (0.975, [193, 189, 185, 181, 177, 173, 169, 165, 161, 157, 154, 151]),
])
def test_deit_small_schedules_of_the_official_eval_ratios(ratio, after_each_block):
    """The official evaluation scripts' ratios on DeiT-S: r = floor(T - T ratio) of the T patch tokens in
    every block, Python float arithmetic (196 - 196 * 0.9 = 19.59... -> 19)."""
    model = get_method("pitome").build(deit_small(), ratio=ratio)
    x = torch.randn(1, 3, 224, 224)
    ledger = measure_gmacs(model, x)
    assert ledger.tokens_per_block()[0].tolist() == [197] + after_each_block[:-1]
    with torch.inference_mode():
        assert model.trace(x)[-1][1].shape[1] == after_each_block[-1]
    assert ledger.matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)
