"""DPC-KNN: before each reduction stage, cluster the patch tokens by density peaks and average each cluster.

Before blocks 3, 6 and 9 the patch tokens of the block input are clustered into K = int(N rho^s) clusters
(N the model's patches, s = 1, 2, 3). With distances d_ij = ||x_i - x_j|| / sqrt(C), a token's density is
exp(-mean d^2) over its k = 5 nearest tokens (itself included), and its separation the distance to the
nearest denser token (the largest distance in the image for the densest). The K tokens with the highest
density x separation are the centres, in that order; every token joins its nearest centre, and each
cluster becomes the mean of its members, sum(x) / (n + 1e-6) as in the code, after the class token.
Sizes are not kept and attention is not proportional.
From TCFormer (Zeng et al., "Not All Tokens Are Equal", CVPR 2022; zengwang430521/TCFormer), as benchmarked
in Haurum et al., ICCV Workshops 2023 (JoakimHaurum/TokenReduction, `models/dpcknn.py`), where the models
are fine-tuned; here it runs off the shelf. Deviations: the members are weighted equally (the code's
`--equal_weight`; its default weight is a learned score that needs training); no random noise is added to
the densities (the code adds U[0, 1e-6) from the global RNG to break ties, which makes an image's clusters
depend on its batch and on the RNG state), so exactly tied densities are both "not denser" than each other;
every prefix token bypasses clustering.
"""

import torch

from tokenbench.reduce import (
    Merge,
    Method,
    Position,
    TokenReducedViT,
    TokenReducer,
    keep_rate_knob,
    reduction_stages,
    register_method,
)

NEIGHBOURS = 5  # the benchmark's --k_neighbors default


class DensityPeakReducer(TokenReducer):
    position = Position.BEFORE_BLOCK

    def __init__(self, clusters: int):
        super().__init__()
        self.clusters = clusters

    def decide(self, x, state, info):
        p = state.prefix
        patches = x[:, p:]
        batch, n, channels = patches.shape
        k = min(self.clusters, n)
        if k == n:
            return None
        dist = torch.cdist(patches, patches) / channels ** 0.5
        nearest = dist.topk(min(NEIGHBOURS, n), dim=-1, largest=False).values
        density = (-(nearest ** 2).mean(dim=-1)).exp()
        denser = (density[:, None, :] > density[:, :, None]).to(x.dtype)
        farthest = dist.flatten(1).max(dim=-1).values[:, None, None]
        separation = (dist * denser + farthest * (1 - denser)).min(dim=-1).values
        centres = (separation * density).topk(k, dim=-1).indices
        cluster = dist.gather(1, centres[..., None].expand(-1, -1, n)).argmin(dim=1)  # [B, n]: nearest centre
        cluster.scatter_(1, centres, torch.arange(k, device=x.device).expand(batch, k))
        is_centre = torch.zeros_like(cluster, dtype=torch.bool).scatter_(1, centres, True)
        members = is_centre.to(torch.int8).argsort(dim=1, stable=True)[:, :n - k]  # the others, in index order
        prefix = torch.arange(p, device=x.device).expand(batch, p)
        eps = torch.cat([x.new_zeros(batch, p), x.new_full((batch, k), 1e-6)], dim=1)
        return Merge(kept=torch.cat([prefix, p + centres], dim=1), merged=p + members,
                     into=p + cluster.gather(1, members), weight=x.new_ones(batch, x.shape[1]), eps=eps,
                     macs=n * n * channels)


@register_method
class DPCKNN(Method):
    name = "dpcknn"
    family = "merge"
    knobs = (keep_rate_knob((0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
                            help="DPC-KNN: clusters kept at the s-th stage are int(patches * keep^s)"),)
    summary = "cluster patch tokens before blocks 3/6/9 by density peaks (k-NN density); average each cluster"

    def build(self, model, keep=1.0):
        reducers = {b: DensityPeakReducer(k) for b, k in reduction_stages(model, keep).items()}
        return TokenReducedViT(model, reducers, proportional_attention=False)
