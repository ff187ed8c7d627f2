"""Zero-TPrune: prune by importance from a weighted PageRank over the attention graph, and by similarity.

After attention (and its residual) in blocks 3, 6, 9, each of the n patch tokens (ceil(keep x n) stay, as
EViT's schedule) is scored per head by a weighted PageRank on the block's attention map: the attention
matrix A (row i: what token i attends to) is the graph, and the score s, started uniform with the class
token at sqrt(N) times the others, is iterated s <- A^T s (a token is important when important tokens
attend to it); 30 iterations in block 3, 10 in block 6, 1 in block 9 (the paper: 30-50 shallow, 5-10
middle, 1 deep). Heads are combined by their root mean square (the paper's emphasizing informative
region). One pruning layer then runs I' -> S -> I:
- I': the ranking after the first iteration splits the patch tokens into the less important half (A) and
  the more important half (B) (the paper's "sequential" partition);
- S: every A token finds its most similar B token (cosine of the head-mean keys); the half of the tokens
  to remove that is most similar to B goes (floor of half);
- I: of the tokens left, the least important by the full PageRank go until ceil(keep x n) remain.
The kept tokens stay in their original order after the prefix tokens.
Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in
Pre-Trained Transformers", CVPR 2024. No official code has been found (the authors' lab has none public;
a third-party attempt computes something else), so this is a reconstruction from the paper's description,
not checked against an implementation: the blocks, the split of each layer's budget between S and I, the
iteration counts per block and the output order are tokenbench's choices. The paper's variance-based head
filter is left out: the normalisation its [0.01, 0.7] bounds refer to is not stated.
"""

import math

import torch

from tokenbench.reduce import (
    Method,
    Need,
    Prune,
    TokenReducedViT,
    TokenReducer,
    keep_count,
    keep_rate_knob,
    reduction_stages,
    register_method,
)

ITERATIONS = (30, 10, 1)  # PageRank iterations in the shallow, middle and deep reduction block


def weighted_pagerank(weights: torch.Tensor, iterations: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, N] importance after one iteration, [B, N] after `iterations`), each the root mean square over
    heads of s <- A^T s on the [B, H, N, N] attention map, from a start with the prefix tokens at sqrt(N)."""
    n = weights.shape[-1]
    start = torch.ones(weights.shape[:3], dtype=weights.dtype, device=weights.device)
    start[..., :prefix] = math.sqrt(n)
    score = (start / start.sum(dim=-1, keepdim=True))[:, :, None, :]  # [B, H, 1, N]
    first = None
    for _ in range(iterations):
        score = score @ weights  # s_i <- sum_j s_j A_ji
        if first is None:
            first = score
    rms = lambda s: s[:, :, 0].pow(2).mean(dim=1).sqrt()  # noqa: E731
    return rms(first), rms(score)


class ZeroTPruneReducer(TokenReducer):
    needs = Need.PLAIN_WEIGHTS | Need.KEYS

    def __init__(self, keep_rate: float, iterations: int):
        super().__init__()
        self.keep_rate, self.iterations = keep_rate, iterations

    def decide(self, x, state, info):
        p = state.prefix
        n = x.shape[1] - p
        k = keep_count(self.keep_rate, n)
        if k == n:
            return None
        first, full = weighted_pagerank(info.plain_weights, self.iterations, p)
        first, full = first[:, p:], full[:, p:]
        remove = n - k
        similar = remove // 2
        rank = first.argsort(dim=1, descending=True)  # I': more important first
        b, a = rank[:, :n - n // 2], rank[:, n - n // 2:]  # B: the more important half, A: the rest
        metric = info.keys.mean(dim=1)[:, p:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        pick = lambda idx: metric.gather(1, idx[..., None].expand(-1, -1, metric.shape[-1]))  # noqa: E731
        best = (pick(a) @ pick(b).transpose(1, 2)).amax(dim=-1)  # [B, |A|]: each A token's closest B token
        dropped = a.gather(1, best.topk(similar, dim=1).indices)
        full = full.scatter(1, dropped, float("-inf"))  # S removed these; I ranks the rest
        keep = full.topk(k, dim=1).indices.sort(dim=1).values
        return Prune(keep=keep, macs=self.iterations * info.plain_weights.shape[1] * (n + p) ** 2
                     + a.shape[1] * b.shape[1] * metric.shape[-1])


@register_method
class ZeroTPrune(Method):
    name = "zerotprune"
    family = "prune"
    knobs = (keep_rate_knob(),)
    summary = "PageRank importance on the attention graph, then similarity pruning, at blocks 3/6/9 (no official code)"

    def build(self, model, keep=1.0):
        blocks = reduction_stages(model, keep)
        return TokenReducedViT(model, {i: ZeroTPruneReducer(keep, it) for i, it in zip(blocks, ITERATIONS)})
