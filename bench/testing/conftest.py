"""Fixtures of the conformance suite: a small seeded ViT of the embedded architecture and random images."""

import pytest
import timm
import torch

import tokenbench.models.loading  # noqa: F401  (registers vit_digits with timm)


@pytest.fixture
def tiny_vit():
    """The embedded architecture (12 blocks, 65 tokens) with seeded random weights: shapes, not accuracy."""
    torch.manual_seed(0)
    return timm.create_model("vit_digits").eval()


@pytest.fixture
def digit_images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)
