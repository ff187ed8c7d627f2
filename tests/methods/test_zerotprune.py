"""Zero-TPrune (a reconstruction from the paper: no official code exists) against its rules written out per
image: weighted PageRank per head on the attention graph, heads by root mean square, I' -> S -> I."""

import math

import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


def zerotprune_step(keep, blocks=(3, 6, 9), iterations=(30, 10, 1)):
    def reduce(i, x, attn, keys, values, size):
        if i not in blocks:
            return x, size
        a_map = attn[0]  # [H, N, N]
        n_all = a_map.shape[-1]
        n = n_all - 1
        k = min(n, math.ceil(keep * n))
        if k == n:
            return x, size
        start = torch.ones(n_all, dtype=x.dtype)
        start[0] = math.sqrt(n_all)
        start = start / start.sum()
        per_head = []
        for h in range(a_map.shape[0]):
            s, history = start.clone(), []
            for _ in range(iterations[blocks.index(i)]):
                s = torch.stack([sum(s[j] * a_map[h, j, t] for j in range(n_all)) for t in range(n_all)])
                history.append(s)
            per_head.append((history[0], history[-1]))
        first = torch.stack([f for f, _ in per_head]).pow(2).mean(0).sqrt()[1:]
        full = torch.stack([s for _, s in per_head]).pow(2).mean(0).sqrt()[1:]
        order = sorted(range(n), key=lambda t: -first[t].item())
        group_b, group_a = order[:n - n // 2], order[n - n // 2:]
        metric = keys[0].mean(0)[1:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        closest = {t: max(float(metric[t] @ metric[u]) for u in group_b) for t in group_a}
        gone = set(sorted(group_a, key=lambda t: -closest[t])[:(n - k) // 2])
        left = [t for t in range(n) if t not in gone]
        kept = sorted(sorted(left, key=lambda t: -full[t].item())[:k])
        index = [0] + [1 + t for t in kept]
        return x[:, index], size[:, index]

    return reduce


def test_logits_equal_the_written_out_algorithm():
    vit = small_vit("deit_small_patch16_224")  # 17 tokens
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for keep in (0.5, 0.8):
        with torch.inference_mode():
            fast = get_method("zerotprune").build(vit, keep=keep)(images)
            slow = torch.cat([plain_logits(vit, img[None], zerotprune_step(keep), proportional=False,
                                           plain_attention=True) for img in images])
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_deit_small_schedule_is_evits():
    """keep 0.7 at blocks 3, 6, 9: ceil(0.7 n) of n patch tokens, 197 -> 139 -> 98 -> 69, as top-k."""
    ledger = measure_gmacs(get_method("zerotprune").build(deit_small(), keep=0.7), torch.randn(1, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
