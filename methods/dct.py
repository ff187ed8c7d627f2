"""DCT: shorten the token sequence by a low-pass in the frequency domain, no training needed.

After each block's MLP, the n patch tokens, in sequence order, are taken to the frequency domain by an
orthonormal DCT-II along the sequence (each channel separately), the r highest frequencies are cut, and an
orthonormal inverse DCT of the shorter length gives n - r new tokens; prefix tokens are not transformed.
r is the same in every block (capped at half the patch tokens). As one linear map this is
C_{n-r}^T C_n[:n-r] applied to the patch tokens, which is how it runs here.
He et al., "Fourier Transformer: Fast Long Range Modeling by Removing Sequence Redundancy with FFT Operator",
ACL Findings 2023; in a ViT as OpenToMe implements it (official code: Westlake-AI/OpenToMe at 4b791cb,
`opentome/tome/dct.py` `dc_matching` and `opentome/timm/dct.py` `DCTBlock`).

Deviations:
- arithmetic: the official code casts the tokens to float32 and uses FFTs; here the same linear map runs as
  one matrix product in the model's dtype (the results agree to float32 rounding; in float64 exactly).
- prefix tokens: all of them are kept (the official code keeps the class token; a distillation token
  would be transformed with the patches).
Attention stays plain (the official DCT block passes no token sizes), so `proportional_attention` is off.
"""

import functools
import math

import numpy as np
import torch

from tokenbench.reduce import Knob, Method, Position, Propagate, TokenReducedViT, TokenReducer, register_method


@functools.lru_cache(maxsize=256)
def low_pass(n: int, r: int) -> torch.Tensor:
    """[n - r, n] in float64: orthonormal DCT-II of length n, its first n - r coefficients, the inverse DCT of
    length n - r. A constant of (n, r), like a weight: built once, in numpy so that no FLOP count sees it."""
    def dct_matrix(length, rows):
        k = np.arange(rows, dtype=np.float64)[:, None]
        i = np.arange(length, dtype=np.float64)
        basis = np.cos(math.pi * (2 * i + 1) * k / (2 * length)) * math.sqrt(2 / length)
        basis[0] /= math.sqrt(2)
        return basis

    return torch.from_numpy(dct_matrix(n - r, n - r).T @ dct_matrix(n, n - r))


class LowPassReducer(TokenReducer):
    position = Position.AFTER_BLOCK

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def decide(self, x, state, info):
        n = x.shape[1] - state.prefix
        r = min(self.r, n // 2)
        if r <= 0:
            return None
        batch = x.shape[0]
        weight = low_pass(n, r).to(dtype=x.dtype, device=x.device).expand(batch, -1, -1)
        donors = torch.arange(n, device=x.device).expand(batch, n)
        return Propagate(keep=None, donors=donors, weight=weight)


@register_method
class DCT(Method):
    name = "dct"
    family = "merge"
    knobs = (Knob("r", (4, 8, 13, 16), noop=0, kind=int, low=0, low_inclusive=True,
                  help="frequencies cut (tokens removed) after every block (DCT)"),)
    summary = "after every block: cut the r highest DCT frequencies of the token sequence"

    def build(self, model, r=0):
        reducers = {i: LowPassReducer(r) for i in range(len(model.blocks))} if r > 0 else {}
        return TokenReducedViT(model, reducers, proportional_attention=False)
