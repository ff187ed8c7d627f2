"""VisionZip: at one block, keep the dominant tokens by class attention and fold the rest into a few contextual tokens.

After block 3's MLP (0-based block 2), per image: the patch tokens the class token attends to most (its
attention row summed over heads) stay as dominant tokens, in their original order after the prefix tokens.
The other patch tokens, in their original order, are compared by the cosine similarity of the block's keys
averaged over heads; `contextual` of them, evenly spaced in that order (every (remaining // contextual)-th,
from the first), become targets, and every other remaining token joins its most similar target (the first
on ties). A contextual token is its target plus the plain mean of the tokens that joined it. Output:
prefix, dominant, contextual (in target order); the later blocks run on these tokens only.
Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025 (official
code: dvlab-research/VisionZip, `visionzip/clip_encoder.py`, the decision of `CLIPVisionTower_VisionZip`).

Deviations, because the official code reduces a VLM's vision-encoder output (layer -2 of CLIP ViT-L, whose
tokens go to the language model) and a classifier saves nothing there:
- where: after block 3 of the classifier, not at layer -2, so that the remaining blocks run on fewer tokens;
  the decision uses that block's attention, keys and output exactly as the official code uses layer -2's.
- how many: `dominant` is a fraction of the patch tokens (round(dominant x patches), Python's round, are kept; the official
  count includes the class token: its `dominant` = 1 + that), so one sweep fits every resolution.
- prefix tokens: all of them are kept (the code keeps the one class token at index 0); on a model without
  a class token, the mean attention each token receives stands in for the class-token row (as for top-k).
Later blocks use plain attention: the official output goes to the language model without sizes.
"""

import torch

from tokenbench.reduce import Knob, Merge, Method, Need, Position, TokenReducedViT, TokenReducer, register_method

BLOCK = 2  # 0-based: VisionZip reduces after this block's MLP


class VisionZipReducer(TokenReducer):
    needs = Need.CLS_ATTN | Need.KEYS
    position = Position.AFTER_BLOCK

    def __init__(self, dominant: float, contextual: int):
        super().__init__()
        self.dominant, self.contextual = dominant, contextual

    def decide(self, x, state, info):
        p, n = state.prefix, x.shape[1]
        patches = n - p
        n_dominant = min(round(self.dominant * patches), patches)
        n_rest = patches - n_dominant
        n_context = min(self.contextual, n_rest)
        if n_rest == 0:
            return None
        batch, device = x.shape[0], x.device
        score = info.cls_attn[:, :, p:].sum(dim=1)  # [B, patches]
        dominant = score.topk(n_dominant, dim=1).indices.sort(dim=1).values
        rest_mask = torch.ones(batch, patches, dtype=torch.bool, device=device).scatter(1, dominant, False)
        rest = rest_mask.nonzero()[:, 1].view(batch, n_rest)  # remaining patch indices, ascending
        prefix = torch.arange(p, device=device).expand(batch, p)
        if n_context == 0:  # nothing to fold into: the rest is dropped
            return Merge(kept=torch.cat([prefix, p + dominant], dim=1), merged=p + rest[:, :0],
                         into=rest[:, :0], added=True)
        step = max(1, n_rest // n_context)
        targets = torch.arange(0, n_rest, step, device=device)[:n_context]
        joining = torch.ones(n_rest, dtype=torch.bool, device=device)
        joining[targets] = False
        metric = info.keys.mean(dim=1)[:, p:].gather(1, rest[..., None].expand(-1, -1, info.keys.shape[-1]))
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, joining] @ metric[:, targets].transpose(1, 2)  # [B, joining, targets]
        partner = similarity.argmax(dim=2)
        kept = torch.cat([prefix, p + dominant, p + rest[:, targets]], dim=1)
        return Merge(kept=kept, merged=p + rest[:, joining], into=p + n_dominant + partner, added=True,
                     macs=similarity.shape[1] * n_context * metric.shape[-1])


@register_method
class VisionZip(Method):
    name = "visionzip"
    family = "merge"
    knobs = (
        Knob("dominant", (0.8, 0.65, 0.5, 0.3, 0.15), noop=1.0, kind=float, low=0.0, high=1.0,
             help="fraction of the patch tokens kept as dominant tokens (by class attention) after block 3"),
        Knob("contextual", (10,), noop=10, kind=int, low=0, low_inclusive=True,
             help="contextual tokens the other patch tokens are folded into (the official README uses 10)"),
    )
    summary = "after block 3: keep the most class-attended tokens, fold the rest into a few contextual tokens"

    def build(self, model, dominant=1.0, contextual=10):
        reduces = dominant < 1.0 and len(model.blocks) > BLOCK + 1  # every token dominant: nothing to fold
        blocks = {BLOCK: VisionZipReducer(dominant, contextual)} if reduces else {}
        return TokenReducedViT(model, blocks, proportional_attention=False)
