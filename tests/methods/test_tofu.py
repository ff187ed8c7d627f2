"""ToFu against the code the field compares it with: ToMe's matching, prune then MLERP, no sizes."""

import pytest
import timm
import torch
from plain_vit import one_thread, plain_logits, small_vit, without_weights  # noqa: F401  (one_thread: autouse)

from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method


def tofu_step(r, depth):
    """One image, written out: ToMe's alternate split and cosine matching of head-mean keys, class token
    never a source; blocks <= depth // 2 drop the sources, later blocks MLERP them into their partners
    (plain mean of the group times the group's largest norm over the partner's own norm)."""

    def reduce(i, x, attn, keys, values, size):
        r_now = min(r, (x.shape[1] - 1) // 2)
        metric = keys[0].mean(dim=0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[::2] @ metric[1::2].T
        scores[0] = -torch.inf
        best, partner = scores.max(dim=-1)
        order = best.argsort(descending=True)
        sources, unmatched = order[:r_now], order[r_now:].sort().values
        t_a, t_b = x[0, ::2], x[0, 1::2]
        if i <= depth // 2:
            return torch.cat([t_a[unmatched], t_b])[None], size
        fused = t_b.clone()
        for j in range(len(t_b)):
            group = [t_b[j]] + [t_a[s] for s in sources.tolist() if partner[s] == j]
            mean = torch.stack(group).mean(0)
            fused[j] = mean * max(g.norm() for g in group) / t_b[j].norm()
        return torch.cat([t_a[unmatched], fused])[None], size

    return reduce


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit3_small_patch16_224"])
def test_logits_equal_the_written_out_algorithm(name):
    vit = small_vit(name)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("tofu").build(vit, r=1)(images)
        slow = torch.cat([plain_logits(vit, img[None], tofu_step(1, len(vit.blocks)), proportional=False)
                          for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_schedule_and_gmacs_at_r13_as_published():
    """ViT-S at r = 13 off the shelf: 2.7 GMACs (the paper's figure), ToMe's token counts, the matching and
    MLERP's norms charged; the matmuls agree with torch's counter."""
    vit = without_weights(lambda: timm.create_model("vit_small_patch16_224")).to_empty(device="cpu").eval()
    for param in vit.parameters():
        param.data.normal_(std=0.02)
    model = get_method("tofu").build(vit, r=13)
    x = torch.randn(1, 3, 224, 224)
    ledger = measure_gmacs(model, x)
    assert round(ledger.gmacs.item(), 1) == 2.7
    assert ledger.tokens_per_block()[0].tolist() == [197 - 13 * i for i in range(12)]
    assert ledger.matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)


def test_early_blocks_prune_and_late_blocks_fuse_every_patch():
    vit = small_vit("deit_small_patch16_224")
    stages = get_method("tofu").build(vit, r=1).trace(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    held = {block: (source[0, 1:] > 0).sum().item() for block, source in stages}  # patches held by a token
    assert sorted(held) == list(range(12)) and stages[-1][1].shape[1] == 17 - 12
    assert held[0] == 16 - 1 and held[6] == 16 - 7  # pruned patches are held by no token
    assert held[7] == held[6] and held[11] == held[6]  # fused ones stay held by their partner
