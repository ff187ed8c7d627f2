"""DCT against its definition: the orthonormal DCT-II of the patch-token sequence (per channel), its first
n - r coefficients, the orthonormal inverse DCT of length n - r; after every block's MLP, r capped at n // 2."""

import math

import pytest
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit  # noqa: F401  (one_thread: autouse)

from tokenbench.methods.dct import low_pass
from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


def test_a_case_worked_by_hand():
    """A constant sequence has only the zero frequency: n -> n - r tokens, each sqrt(n / (n - r)) times it
    (the orthonormal scalings); the highest frequency alone is cut to nothing."""
    n, r = 4, 2
    constant = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(low_pass(n, r) @ constant, torch.full((2,), math.sqrt(2.0), dtype=torch.float64))
    top = torch.tensor([math.cos(math.pi * (2 * i + 1) * 3 / 8) for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(low_pass(n, r) @ top, torch.zeros(2, dtype=torch.float64), atol=1e-15, rtol=0)


def dct_by_definition(x, keep):
    """[n, C] -> [keep, C]: the sums of the orthonormal DCT-II and DCT-III, written out."""
    n = len(x)
    scale = lambda k, m: math.sqrt((1 if k == 0 else 2) / m)  # noqa: E731
    coeffs = [sum(x[i] * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)) * scale(k, n)
              for k in range(keep)]
    return torch.stack([sum(coeffs[k] * math.cos(math.pi * (2 * j + 1) * k / (2 * keep)) * scale(k, keep)
                            for k in range(keep)) for j in range(keep)])


def dct_step(r):
    def after(i, x, attn, keys):
        n = x.shape[1] - 1
        cut = min(r, n // 2)
        return torch.cat([x[:, :1], dct_by_definition(x[0, 1:], n - cut)[None]], dim=1)

    return after


@pytest.mark.parametrize("r", [1, 3, 8])
def test_logits_equal_the_written_out_algorithm(r):
    vit = small_vit("deit_small_patch16_224", depth=4)  # 17 tokens: 16 patches
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = get_method("dct").build(vit, r=r)(images)
        slow = torch.cat([plain_logits(vit, img[None], proportional=False, after=dct_step(r)) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_deit_small_schedule():
    """r = 13 after every block's MLP: 196, 183, ..., 40 patch tokens (plus the class token) enter blocks 0-11."""
    ledger = measure_gmacs(get_method("dct").build(deit_small(), r=13), torch.randn(1, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [197 - 13 * i for i in range(12)]


def test_the_trace_gives_the_new_tokens_no_patch():
    """After a low-pass the tokens are mixtures of every patch: the trace holds none of them."""
    vit = small_vit("deit_small_patch16_224", depth=2)
    stages = get_method("dct").build(vit, r=4).trace(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert [source.shape[1] for _, source in stages] == [13, 9]
    assert all(source.sum() == 0 for _, source in stages)
