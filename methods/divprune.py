"""DivPrune: keep the most diverse subset of tokens, chosen greedily by max-min cosine distance, no training.

Once, after block 3's MLP (0-based block 2), per image: the distance of two patch tokens is 1 - the cosine
similarity of their features. The first token chosen is the one whose nearest other token is farthest (the
second-smallest distance in its column, the smallest being its own); each next one is the token farthest
from everything chosen so far (the largest column minimum over the chosen rows); ties go to the lowest
index. int(round(keep x patches)) tokens are chosen (Python's round), kept in their original order after
the prefix tokens; the rest are dropped and the later blocks run on the kept tokens only.
Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025
(official code: vbdi/divprune at 799e2d9, `LLaVA/llava/model/llava_arch.py`, `DivPrune` and its call).

Deviations, because the official code prunes a multimodal LLM's visual tokens (CLIP ViT-L's layer -2
through LLaVA's projector, before the language model's first layer) and a classifier saves nothing there:
- where: after block 3 of the classifier, as for VisionZip, so that the remaining blocks run on fewer
  tokens; the features are that block's output tokens (the official code uses the projector's output).
- prefix tokens: all of them are kept and none is a candidate (the official candidates are the visual
  tokens only; the system-prompt and text tokens around them are always kept).
- batches: the greedy selection runs for every image of a batch at once (the official code takes one
  image); each image's choice is the same as alone.
"""

import torch

from tokenbench.reduce import Method, Position, Prune, TokenReducedViT, TokenReducer, keep_rate_knob, register_method

BLOCK = 2  # 0-based: DivPrune prunes once, after this block's MLP


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] indices of `features` ([B, n, d]) chosen greedily by DivPrune's max-min cosine distance."""
    normed = features / features.norm(dim=-1, keepdim=True)
    distance = 1.0 - normed @ normed.transpose(1, 2)  # [B, n, n]
    chosen = torch.empty(features.shape[0], count, dtype=torch.long, device=features.device)
    # The first pick: the largest distance to its nearest other token (second-smallest in its column).
    nearest = distance.topk(2, dim=1, largest=False).values[:, 1, :]
    chosen[:, 0] = nearest.argmax(dim=1)
    rows = torch.arange(features.shape[0], device=features.device)
    to_chosen = distance[rows, chosen[:, 0]]  # [B, n]: each column's minimum over the chosen rows so far
    for i in range(1, count):
        chosen[:, i] = to_chosen.argmax(dim=1)
        to_chosen = torch.minimum(to_chosen, distance[rows, chosen[:, i]])
    return chosen


class DiversityReducer(TokenReducer):
    position = Position.AFTER_BLOCK

    def __init__(self, keep_rate: float):
        super().__init__()
        self.keep_rate = keep_rate

    def decide(self, x, state, info):
        patches = x.shape[1] - state.prefix
        count = min(int(round(self.keep_rate * patches)), patches)
        if count >= patches:
            return None
        features = x[:, state.prefix:]
        keep = max_min_diverse(features, max(count, 1)).sort(dim=1).values
        return Prune(keep=keep, macs=patches * patches * x.shape[-1])


@register_method
class DivPrune(Method):
    name = "divprune"
    family = "prune"
    knobs = (keep_rate_knob((0.8, 0.65, 0.5, 0.3, 0.15), "fraction of the patch tokens kept, once, after block 3"),)
    summary = "after block 3: keep the most diverse tokens (greedy max-min cosine distance)"

    def build(self, model, keep=1.0):
        reduces = keep < 1.0 and len(model.blocks) > BLOCK + 1
        return TokenReducedViT(model, {BLOCK: DiversityReducer(keep)} if reduces else {})
