"""ATC (Agglomerative Token Clustering): after attention in blocks 3, 6 and 9, cluster the patch tokens
bottom-up and average each cluster.

The patch tokens' distances are 1 - cos(k_i, k_j) of the block's keys averaged over heads; hierarchical
agglomerative clustering with the chosen linkage (average by default; single, complete) is cut at
K = int(N rho^s) clusters (N the model's patches, s = 1, 2, 3; 0.7 on DeiT-S: 137, 96, 67), and each
cluster becomes the plain mean of its members, after the class token. Sizes are not carried from block
to block and attention is not proportional (the code's default without `--proportional_attn`).
Haurum et al., "Agglomerative Token Clustering", ECCV 2024 (official code: JoakimHaurum/ATC,
`ATC_setup/models/atc.py`), applied off the shelf as the paper's training-free results. The linkage is
scipy's, which is what scikit-learn's `AgglomerativeClustering` (the official code) runs for these
linkages without connectivity, so the clusters are the same; deviations: the clusters follow the class
token ordered by their first member rather than by scikit-learn's label ids (the order of tokens does not
change the result), and every prefix token bypasses clustering.
"""

import numpy as np
import torch

from tokenbench.reduce import (
    Knob,
    Merge,
    Method,
    Need,
    TokenReducedViT,
    TokenReducer,
    keep_rate_knob,
    reduction_stages,
    register_method,
)

LINKAGES = ("average", "complete", "single")


def cut_labels(distance: np.ndarray, clusters: int, linkage: str) -> np.ndarray:
    """Cluster label per token ([n]) from an [n, n] distance matrix, labels numbered by first member.

    The tree is cut where it has `clusters` clusters, i.e. after its first n - clusters merges (as
    scikit-learn cuts it); the roots are found by pointer jumping, vectorised.
    """
    from scipy.cluster.hierarchy import linkage as build_tree

    n = len(distance)
    merges = build_tree(distance[np.triu_indices(n, k=1)].astype(np.float64), method=linkage)[:n - clusters]
    parent = np.arange(2 * n - 1)
    parent[merges[:, :2].astype(np.int64)] = (n + np.arange(len(merges)))[:, None]
    for _ in range(max(1, int(np.ceil(np.log2(n))) + 1)):
        parent = parent[parent]
    roots = parent[:n]
    _, first, labels = np.unique(roots, return_index=True, return_inverse=True)
    renumber = np.empty(len(first), dtype=np.int64)
    renumber[np.argsort(first)] = np.arange(len(first))  # first-appearance order
    return renumber[labels]


class AgglomerativeReducer(TokenReducer):
    needs = Need.KEYS

    def __init__(self, clusters: int, linkage: str):
        super().__init__()
        self.clusters, self.linkage = clusters, linkage

    def decide(self, x, state, info):
        p = state.prefix
        batch, n = x.shape[0], x.shape[1] - p
        k = min(self.clusters, n)
        if k == n:
            return None
        metric = info.keys.mean(dim=1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        distance = (1 - metric @ metric.transpose(-1, -2))[:, p:, p:].detach().cpu().numpy()
        labels = torch.from_numpy(np.stack([cut_labels(d, k, self.linkage) for d in distance])).to(x.device)
        # The first member of each cluster stands for it; the others merge into it.
        first = torch.zeros_like(labels, dtype=torch.bool)
        order = labels.argsort(dim=1, stable=True)
        starts = torch.ones_like(labels, dtype=torch.bool)
        starts[:, 1:] = labels.gather(1, order[:, 1:]) != labels.gather(1, order[:, :-1])
        first.scatter_(1, order, starts)
        heads = first.to(torch.int8).argsort(dim=1, stable=True, descending=True)[:, :k]  # by index = by label
        members = first.to(torch.int8).argsort(dim=1, stable=True)[:, :n - k]
        prefix = torch.arange(p, device=x.device).expand(batch, p)
        return Merge(kept=torch.cat([prefix, p + heads], dim=1), merged=p + members,
                     into=p + labels.gather(1, members), weight=x.new_ones(batch, x.shape[1]),
                     macs=(p + n) ** 2 * metric.shape[-1])


@register_method
class ATC(Method):
    name = "atc"
    family = "merge"
    batch_invariant = True
    knobs = (keep_rate_knob((0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
                            help="ATC: clusters kept at the s-th stage are int(patches * keep^s)"),
             Knob("linkage", ("average",), noop="average", kind=str, choices=LINKAGES,
                  help="ATC: the agglomerative clustering's linkage (average, complete, single)"))
    summary = "agglomerative clustering of patch tokens in blocks 3/6/9 (cosine of keys); average each cluster"

    def build(self, model, keep=1.0, linkage="average"):
        reducers = {b: AgglomerativeReducer(k, linkage) for b, k in reduction_stages(model, keep).items()}
        return TokenReducedViT(model, reducers, proportional_attention=False)
