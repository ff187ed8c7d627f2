"""The FLOP ledger: per-image multiply-accumulates of the computation actually run.

Convention of the DeiT, EViT and ToMe papers (and fvcore): one multiply-add is one MAC; linear, matmul and
convolution layers count in*out per token; LayerNorm counts 5 per element (4 without affine); GELU,
softmax and additions count nothing. Dense DeiT-S is 4.608 GMACs, ViT-B 17.583.

Models record what they run while a ledger is active (`with CostLedger(batch) as ledger: model(x)`):
blocks record how many tokens entered attention and the MLP *per image*, methods add their own overhead
(a matching matmul, a predictor). Nothing is recorded when no ledger is active, so timing runs pay nothing.
fvcore misses timm's fused attention; `flop_counter_gmacs` cross-checks the ledger with torch's
FlopCounterMode, which sees real runtime shapes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

_ACTIVE: list["CostLedger"] = []


def active_ledger() -> "CostLedger | None":
    """The ledger of the GMACs count in progress, or None: a model-level method (DVT) adds its cost to it."""
    return _ACTIVE[-1] if _ACTIVE else None


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or type(m).__name__ in {
        "LayerNorm", "RmsNorm", "LayerNorm2d"}


def norm_macs_per_token(module: nn.Module) -> int:
    """fvcore's count for the norms inside `module`, per token: 5 per element (4 without affine)."""
    total = 0
    for m in module.modules():
        if _is_norm(m):
            numel = 1
            for d in m.normalized_shape:
                numel *= d
            affine = getattr(m, "elementwise_affine", True) and getattr(m, "weight", None) is not None
            total += (5 if affine else 4) * numel
    return total


def linear_macs_per_token(module: nn.Module) -> int:
    """in*out for every nn.Linear inside `module`: the MACs it spends on one token."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class BlockCost:
    """MACs of one transformer block as a function of the tokens that enter attention and the MLP."""

    attn_linear: int  # per attention token: qkv
    attn_norm: int  # per attention token: norm1, q/k norms
    attn_pair: int  # per (query, key) pair: QK^T and AV over all heads
    out_linear: int  # per query token: proj (and a gate, if any)
    out_norm: int  # per query token: attention-output norm
    mlp_linear: int  # per MLP token
    mlp_norm: int  # per MLP token: norm2 (and an MLP norm, if any)

    @classmethod
    def of(cls, block: nn.Module) -> "BlockCost":
        attn = block.attn
        qkv = linear_macs_per_token(attn.qkv)
        out_norm = norm_macs_per_token(attn.norm)
        return cls(
            attn_linear=qkv,
            attn_norm=norm_macs_per_token(block.norm1) + norm_macs_per_token(attn) - out_norm,
            attn_pair=2 * attn.num_heads * attn.head_dim,
            out_linear=linear_macs_per_token(attn) - qkv,
            out_norm=out_norm,
            mlp_linear=linear_macs_per_token(block.mlp),
            mlp_norm=norm_macs_per_token(block.norm2) + norm_macs_per_token(block.mlp),
        )

    def macs(self, n_attn, n_mlp, n_query=None):
        """(total, norm part). `n_query`, the tokens whose attention output is computed, defaults to `n_attn`."""
        n_query = n_attn if n_query is None else n_query
        norm = self.attn_norm * n_attn + self.out_norm * n_query + self.mlp_norm * n_mlp
        linear = self.attn_linear * n_attn + self.out_linear * n_query + self.mlp_linear * n_mlp
        return linear + self.attn_pair * n_query * n_attn + norm, norm


def embed_macs(patch_embed: nn.Module) -> int:
    """MACs of a (2D or 3D) convolutional patch embedding: kernel size times output positions."""
    proj = patch_embed.proj
    return proj.weight.numel() * patch_embed.num_patches + (norm_macs_per_token(patch_embed) * patch_embed.num_patches)


class CostLedger(contextlib.AbstractContextManager):
    """Accumulates per-image MACs (and the tokens entering each block) while active."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.macs = torch.zeros(batch_size, dtype=torch.float64)
        self.norm_macs = torch.zeros(batch_size, dtype=torch.float64)
        self.block_tokens: list[torch.Tensor] = []  # tokens entering attention, per block, per image
        self.notes: dict[str, torch.Tensor] = {}  # per-image values a method reports (e.g. which exit)
        self._rows: list[torch.Tensor] = []

    def __enter__(self):
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return False

    def _per_image(self, value) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float64)
        n = len(self._rows[-1]) if self._rows else self.batch_size
        return torch.as_tensor(value, dtype=torch.float64).expand(n).clone()

    def _scatter(self, target: torch.Tensor, value) -> None:
        value = self._per_image(value)
        if self._rows:
            target.index_add_(0, self._rows[-1], value)
        else:
            target += value

    def add(self, macs, norm_macs=0) -> None:
        """Add MACs (a number, or one per image of the current rows); `norm_macs` is the norm part of them."""
        self._scatter(self.macs, macs)
        self._scatter(self.norm_macs, norm_macs)

    def add_block(self, cost: BlockCost, n_attn, n_mlp, n_query=None) -> None:
        total, norm = cost.macs(n_attn, n_mlp, n_query)
        self.add(total, norm)
        tokens = torch.zeros(self.batch_size, dtype=torch.float64)
        self._scatter(tokens, n_attn)
        self.block_tokens.append(tokens)

    def note(self, name: str, values) -> None:
        """Record a per-image value (for the current rows) that the results row reports as a mean."""
        target = self.notes.setdefault(name, torch.zeros(self.batch_size, dtype=torch.float64))
        self._scatter(target, values)

    @contextlib.contextmanager
    def rows(self, index: torch.Tensor):
        """Record for a subset of the batch (the images still running in a cascade)."""
        index = index.detach().to("cpu", torch.long)
        if self._rows:
            index = self._rows[-1][index]
        self._rows.append(index)
        try:
            yield
        finally:
            self._rows.pop()

    @property
    def gmacs(self) -> torch.Tensor:
        return self.macs / 1e9

    @property
    def matmul_gmacs(self) -> torch.Tensor:
        """Without the norm terms: what torch's FlopCounterMode counts (divided by two)."""
        return (self.macs - self.norm_macs) / 1e9

    def tokens_per_block(self) -> torch.Tensor:
        """[images, blocks] tokens entering each block's attention."""
        if not self.block_tokens:
            return torch.zeros(self.batch_size, 0)
        return torch.stack(self.block_tokens, dim=1)


def measure_gmacs(model: nn.Module, images: torch.Tensor) -> CostLedger:
    """Run `model` once under a ledger and return it."""
    with torch.inference_mode(), CostLedger(images.shape[0]) as ledger:
        model(images)
    return ledger


def flop_counter_gmacs(model: nn.Module, images: torch.Tensor) -> float:
    """Total GMACs of one forward by torch's FlopCounterMode, with the CPU SDPA kernel counted.

    FlopCounterMode counts 2 FLOPs per multiply-add and has no formula for the CPU flash-attention kernel
    (pytorch#195460) nor for `cdist` (the clustering methods' distances; a matrix product inside), so we
    give both theirs and halve the total.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(q_shape, k_shape, v_shape, *args, **kwargs):
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    def cdist(x1_shape, x2_shape, *args, **kwargs):  # [..., P, C] x [..., R, C]: P R C multiply-adds
        return 2 * math.prod(x1_shape[:-1]) * x2_shape[-2] * x1_shape[-1]

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
               torch.ops.aten._euclidean_dist: cdist, torch.ops.aten._cdist_forward: cdist}
    # The counter's module tracker fails on an expanded parameter that requires grad (SigLIP's latent query),
    # even under inference mode: count with the parameters frozen, then restore them.
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(images)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return counter.get_total_flops() / 2 / 1e9
