"""Downsample against timm itself: the same weights built by timm at the lower resolution (position
embedding resampled by timm's own rule) on the bilinearly resized images; sizes and token counts by hand."""

import pytest
import timm
import torch
import torch.nn.functional as F
from plain_vit import deit_small, one_thread  # noqa: F401  (one_thread: autouse)

from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


@pytest.mark.parametrize("scale, side", [(0.875, 192), (0.75, 160), (0.625, 144), (0.5, 112)])
def test_sizes_worked_by_hand(scale, side):
    """14 x 14 patches of 16: 12.25 -> 12, 10.5 -> 10 (Python rounds halves to even), 8.75 -> 9, 7."""
    ledger = measure_gmacs(get_method("downsample").build(deit_small(), scale=scale), torch.randn(1, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [(side // 16) ** 2 + 1] * 12


def test_logits_equal_timm_at_the_lower_resolution():
    torch.manual_seed(0)
    vit = timm.create_model("deit_small_patch16_224", img_size=64, embed_dim=96, num_heads=3).eval().double()
    low = timm.create_model("deit_small_patch16_224", img_size=48, embed_dim=96, num_heads=3).eval().double()
    state = vit.state_dict()
    state["pos_embed"] = timm.layers.resample_abs_pos_embed(vit.pos_embed, new_size=(3, 3), num_prefix_tokens=1)
    low.load_state_dict(state)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    resized = F.interpolate(images, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        fast = get_method("downsample").build(vit, scale=0.75)(images)
        torch.testing.assert_close(fast, low(resized), rtol=0, atol=1e-12)
