"""VisionZip against its official decision rules, written out per image: dominant tokens by the class
attention summed over heads (original order), evenly spaced targets among the rest, each other token into
its most similar target (cosine of head-mean keys), contextual token = target + mean of its joiners."""

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


def visionzip_step(dominant, contextual, block=2):
    """The reduction after block `block`'s MLP, one image, loops and lists."""

    def after(i, x, attn, keys):
        if i != block:
            return x
        patches = x.shape[1] - 1
        n_dominant = round(dominant * patches)
        score = attn[0, :, 0, 1:].sum(0)
        top = sorted(score.topk(n_dominant).indices.tolist())
        rest = [j for j in range(patches) if j not in top]
        metric = keys[0].mean(0)[1:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        tokens = [x[0, 0]] + [x[0, 1 + j] for j in top]
        n_context = min(contextual, len(rest))
        if n_context:
            step = max(1, len(rest) // n_context)
            targets = list(range(0, len(rest), step))[:n_context]
            joined = {t: [] for t in targets}
            for pos, j in enumerate(rest):
                if pos in joined:
                    continue
                sims = [float(metric[j] @ metric[rest[t]]) for t in targets]
                joined[targets[sims.index(max(sims))]].append(x[0, 1 + j])
            for t in targets:
                mean = torch.stack(joined[t]).mean(0) if joined[t] else torch.zeros_like(x[0, 0])
                tokens.append(x[0, 1 + rest[t]] + mean)
        return torch.stack(tokens)[None]

    return after


@pytest.mark.parametrize("dominant, contextual", [(0.5, 3), (0.25, 4), (0.75, 0), (0.5, 100), (0.0625, 1)])
def test_logits_equal_the_written_out_algorithm(dominant, contextual):
    vit = small_vit("deit_small_patch16_224")  # 17 tokens: 16 patches
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("visionzip").build(vit, dominant=dominant, contextual=contextual)(images)
        slow = torch.cat([plain_logits(vit, img[None], proportional=False,
                                       after=visionzip_step(dominant, contextual)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)


def test_deit_small_schedule():
    """dominant 0.5 of 196 patches: 98 dominant + 10 contextual + the class token from block 3 on."""
    ledger = measure_gmacs(get_method("visionzip").build(deit_small(), dominant=0.5), torch.randn(1, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [197] * 3 + [109] * 9
