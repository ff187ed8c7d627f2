"""Random drop: the top-k schedule, but the kept patch tokens are drawn uniformly at random per image.

The baseline of the DynamicViT paper's ablation, placed as in EViT (after attention in blocks 3, 6, 9)
so that it differs from `topk` only in which tokens survive. Seeded: the same `torch.manual_seed` before
`build` (the harness's `--seed`) gives the same tokens. The draws are made per batch, so an image's tokens
depend on its place in the batch (`batch_invariant` is False): only the distribution is the method.
"""

import torch

from tokenbench.reduce import (
    KeepRateReducer,
    Method,
    TokenReducedViT,
    keep_rate_knob,
    reduction_stages,
    register_method,
)


class RandomReducer(KeepRateReducer):
    def __init__(self, keep_rate: float, generator: torch.Generator):
        super().__init__(keep_rate)
        self.generator = generator

    def score(self, x, state, info):
        return torch.rand(x.shape[0], x.shape[1] - state.prefix, generator=self.generator).to(x.device)


@register_method
class RandomDrop(Method):
    name = "random"
    family = "prune"
    knobs = (keep_rate_knob(),)
    batch_invariant = False
    summary = "keep random tokens at blocks 3/6/9 (seeded)"

    def build(self, model, keep=1.0):
        generator = torch.Generator().manual_seed(torch.initial_seed())
        blocks = reduction_stages(model, keep)
        return TokenReducedViT(model, {i: RandomReducer(keep, generator) for i in blocks})
