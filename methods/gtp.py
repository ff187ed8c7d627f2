"""GTP-ViT: graph-based token propagation: remove the least important tokens after passing them to their
graph neighbours, no training needed.

Once per image, from the embedded tokens (before block 0), a graph over the patch tokens: two patches are
linked if they are grid neighbours (the 8 around each) or if one is among the other's `neighbours` most
cosine-similar tokens (its row of cosine similarities at or above the (N - 1 - neighbours)-th smallest value,
N counting every token, itself excluded), and the graph is normalised symmetrically (D^-1/2 A D^-1/2).
After attention (and its residual) in every block, the patch tokens are ranked by MixedAttnMax, the
largest over heads of a token's self-attention times the largest over heads of the attention it receives
from all queries; the r lowest-ranked are removed, and each kept token adds `alpha` times the
graph-weighted sum of the removed ones (its row of the graph restricted to them). The kept tokens stay in
rank order; the graph shrinks to them for the next block. Token sizes follow the same sums and bias later
attention by their log (the official `token_scale`).
Xu et al., "GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation", WACV 2024 (official
code: Ackesnal/GTP-ViT at 97a1178, `models_v3.py`: `select`, `propagate`, `GraphPropagationTransformer`,
with `--selection MixedAttnMax --propagation GraphProp --graph_type Mixed --token_scale`, the README's
setting; `alpha` 0.1 and `num_neighbours` 8 are `main.py`'s defaults).

Deviations:
- attention sparsity (`--sparsity` < 1 zeroes the smallest attention weights in every block) is not
  implemented: this runs the official default, 1 (no sparsification).
- alpha scales the graph weights before the weighted sum (the official code scales the sum): the same up to
  rounding.
- r is capped so that at least one patch token remains (the official code fails beyond that); all prefix
  tokens (a distillation token, registers) are kept like the class token; a non-square patch grid uses its
  own rows and columns for the spatial graph (the official code assumes a square).
- the official code also appends a statistic to a file named `missing` on every propagation; this does not.
"""

import torch

from tokenbench.reduce import (
    BenchError,
    Knob,
    Method,
    Need,
    Propagate,
    TokenReducedViT,
    TokenReducer,
    active_ledger,
    register_method,
)


def grid_graph(rows: int, cols: int, device) -> torch.Tensor:
    """[P, P] 1 where two patches of a rows x cols grid touch (8-neighbourhood), 0 elsewhere and on the diagonal."""
    index = torch.arange(rows * cols, device=device)
    r, c = index // cols, index % cols
    near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    return near.float() - torch.eye(rows * cols, device=device)


def token_graph(tokens: torch.Tensor, n_tokens: int, neighbours: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, P, P] the official Mixed graph of patch `tokens` ([B, P, C]), symmetrically normalised."""
    patches = tokens.shape[1]
    normed = tokens / tokens.norm(dim=-1, keepdim=True)
    similarity = normed @ normed.transpose(-1, -2)
    k = min(max(n_tokens - 1 - neighbours, 1), patches)
    threshold = similarity.kthvalue(k, dim=-1, keepdim=True).values
    eye = torch.eye(patches, device=tokens.device)
    semantic = torch.where(similarity >= threshold, 1.0, 0.0).to(tokens.dtype) - eye.to(tokens.dtype)
    spatial = grid_graph(*grid, tokens.device).expand(tokens.shape[0], -1, -1)
    graph = torch.bitwise_or(semantic.int(), spatial.int()).to(tokens.dtype)
    scale = graph.sum(-1) ** -0.5
    return scale[:, :, None] * graph * scale[:, None, :]


class GraphPropagationReducer(TokenReducer):
    """One reducer for every block: it holds the current graph of the forward pass in progress."""

    needs = Need.LOGITS

    def __init__(self, r: int, alpha: float, neighbours: int, grid: tuple[int, int]):
        super().__init__()
        self.r, self.alpha, self.neighbours, self.grid = r, alpha, neighbours, grid
        self.graph = None

    def begin(self, x, state):
        tokens = x[:, state.prefix:]
        self.graph = token_graph(tokens, x.shape[1], self.neighbours, self.grid)
        ledger = active_ledger()
        if ledger is not None:  # the cosine similarities
            ledger.add(tokens.shape[1] ** 2 * tokens.shape[2])

    def decide(self, x, state, info):
        p, n = state.prefix, x.shape[1] - state.prefix
        r = min(self.r, n - 1)
        if r <= 0:
            return None
        attn = info.logits.softmax(dim=-1)
        self_attention = torch.diagonal(attn, dim1=-2, dim2=-1)[:, :, p:].max(dim=1).values
        received = attn[:, :, :, p:].sum(dim=-2).max(dim=1).values
        rank = torch.argsort(self_attention * received, dim=1, descending=True)
        keep, donors = rank[:, :-r], rank[:, -r:]
        rows = self.graph.gather(1, keep[..., None].expand(-1, -1, n))
        weight = rows.gather(2, donors[:, None, :].expand(-1, keep.shape[1], -1))
        self.graph = rows.gather(2, keep[:, None, :].expand(-1, keep.shape[1], -1))
        return Propagate(keep=keep, donors=donors, weight=self.alpha * weight)


@register_method
class GTP(Method):
    name = "gtp"
    family = "merge"
    knobs = (
        Knob("r", (1, 2, 3, 4, 5), noop=0, kind=int, low=0, low_inclusive=True,
             help="tokens removed per block (GTP-ViT's P; DeiT on 196 tokens: up to 14)"),
        Knob("alpha", (0.1,), noop=0.1, kind=float, low=0.0, low_inclusive=True,
             help="weight of the propagated tokens added to their graph neighbours (GTP-ViT)"),
        Knob("neighbours", (8,), noop=8, kind=int, low=0, low_inclusive=True,
             help="most similar tokens each token links to in GTP-ViT's semantic graph"),
    )
    summary = "every block: remove the r least attended tokens, propagating them to graph neighbours"

    def check_model(self, model):
        super().check_model(model)
        if model.patch_embed.proj.weight.ndim != 4:
            raise BenchError("GTP-ViT's spatial graph is a 2-D patch grid; this model embeds video (3-D patches)")

    def build(self, model, r=0, alpha=0.1, neighbours=8):
        if r <= 0:
            return TokenReducedViT(model)
        reducer = GraphPropagationReducer(r, alpha, neighbours, tuple(model.patch_embed.grid_size))
        return TokenReducedViT(model, {i: reducer for i in range(len(model.blocks))})
