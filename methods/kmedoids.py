"""K-Medoids: before each reduction stage, cluster the patch tokens and keep only the cluster medoids.

Before blocks 3, 6 and 9 the patch tokens of the block input are clustered into K = int(N rho^s) clusters
(N the model's patches, s = 1, 2, 3; rho = 0.7 on DeiT-S: 137, 96, 67). Each token is weighted by the
attention it received in the previous block (summed over heads and queries); the K most attended tokens
start as medoids. Three times: every token joins its nearest medoid (Euclidean distance of the block-input
features), then each cluster's new medoid is the member with the least weighted total distance
w_i sum_j d_ij to all tokens. The medoids themselves (no averaging) follow the class token, in cluster
order; an empty cluster falls back to token 0, and two clusters may share a medoid, as in the code.
Benchmarked in Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers",
ICCV Workshops 2023 (code: JoakimHaurum/TokenReduction, `models/kmedoids.py`), where the models are
fine-tuned; here it is applied off the shelf. Deviation: every prefix token bypasses clustering (the code
protects its `num_tokens` first tokens, the same for DeiT).
"""

import torch

from tokenbench.reduce import (
    Method,
    Need,
    Position,
    Prune,
    TokenReducedViT,
    TokenReducer,
    keep_rate_knob,
    reduction_stages,
    register_method,
)

ITERATIONS = 3  # the benchmark's --cluster_iters default


class MedoidReducer(TokenReducer):
    needs = Need.RECEIVED
    position = Position.BEFORE_BLOCK

    def __init__(self, clusters: int):
        super().__init__()
        self.clusters = clusters

    def decide(self, x, state, info):
        p = state.prefix
        patches = x[:, p:]
        n, k = patches.shape[1], min(self.clusters, patches.shape[1])
        if k == n:
            return None
        weight = info.received[:, p:]
        medoids = weight.topk(k, dim=1).indices
        dist = torch.cdist(patches, patches)
        total = (dist * weight[..., None]).sum(dim=-1)  # w_i sum_j d_ij: a member's cost as its cluster's medoid
        outside = torch.full_like(total, 1e6 * n)  # the code's masked rows: 1e6 in every column
        for _ in range(ITERATIONS):
            assignment = dist.gather(2, medoids[:, None, :].expand(-1, n, -1)).argmin(dim=-1)
            member = assignment[:, None, :] == torch.arange(k, device=x.device)[None, :, None]  # [B, K, n]
            medoids = torch.where(member, total[:, None, :], outside[:, None, :]).argmin(dim=-1)
        return Prune(keep=medoids, macs=n * n * x.shape[-1])


@register_method
class KMedoids(Method):
    name = "kmedoids"
    family = "prune"  # clusters, but keeps a subset of the tokens as they are
    knobs = (keep_rate_knob((0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
                            help="K-Medoids: clusters kept at the s-th stage are int(patches * keep^s)"),)
    summary = "cluster patch tokens before blocks 3/6/9 (attention-weighted k-medoids); keep the medoids"

    def build(self, model, keep=1.0):
        reducers = {b: MedoidReducer(k) for b, k in reduction_stages(model, keep).items()}
        return TokenReducedViT(model, reducers, proportional_attention=False)
