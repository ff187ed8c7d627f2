"""Shared fixtures: small seeded models, the real-data folder beside the checkout."""

import os
from pathlib import Path

import pytest
import timm
import torch

import tokenbench.models.loading  # noqa: F401  (registers vit_digits with timm)
from tokenbench.testing.conftest import digit_images, tiny_vit  # noqa: F401  (the conformance suite's fixtures)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(sub: str) -> Path:
    """A folder of ../shared/data, or skip: it exists on the project's machines and CI, not on users'."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (it sits beside the checkout on the project's machines)")
    return path


@pytest.fixture(autouse=True, scope="session")
def image_store(tmp_path_factory):
    """Keep the decoded-image store of test sweeps out of the user's ~/.cache."""
    os.environ["TOKENBENCH_CACHE"] = str(tmp_path_factory.mktemp("image-store"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tokenbench checkpoint of the embedded architecture with seeded random weights (for sweep mechanics)."""
    from tokenbench.models.loading import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vit_digits_random.pt"
    save_checkpoint(path, timm.create_model("vit_digits"), "vit_digits", {})
    return path


def train_steps(loss_fn, parameters, steps: int, lr: float = 1e-3, seed: int | None = None) -> list[float]:
    """A few AdamW steps on `loss_fn()`; the losses, for tests that training lowers the loss.

    `seed` reseeds torch before each step, so stochastic losses (Gumbel noise) move only with the weights.
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
