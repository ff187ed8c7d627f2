"""`TokenReducedViT`: a timm ViT run block by block with reducers, without forking it; the family check."""

from __future__ import annotations

import torch
import torch.nn as nn

from tokenbench.errors import BenchError
from tokenbench.reduce.attention import CLS_SUBSTITUTE, attention_bias, kernel_log_active
from tokenbench.reduce.block import ReducibleBlock
from tokenbench.reduce.contract import Need, Position, TokenReducer, TokenState
from tokenbench.reduce.ledger import active_ledger, embed_macs, linear_macs_per_token, norm_macs_per_token
from tokenbench.reduce.prefix import active_store

SUPPORTED_FAMILIES = ("DeiT (distilled too), DeiT III, AugReg ViT, CLIP, DINOv2 (with registers too), MAE and other "
                      "average-pool ViTs, SigLIP: timm's VisionTransformer")
HIERARCHICAL = ("Swin is hierarchical: window attention runs on a fixed grid of windows that patch merging halves, "
                "so there is no free token set to prune or merge")
REFUSED_FAMILIES = {  # timm model class -> why its tokens cannot be reduced faithfully here
    "SwinTransformer": HIERARCHICAL,
    "SwinTransformerV2": HIERARCHICAL,
    "Eva": "EVA/EVA-02 rotate queries and keys by a rotary position embedding computed for the full patch grid "
           "inside every block; tokenbench does not yet carry each kept or merged token's rotation through reduction",
    "Beit": "BEiT adds a relative position bias indexed by the full patch grid inside every block; tokenbench does "
            "not yet carry the bias of kept or merged tokens through reduction",
}


def check_vit(model: nn.Module) -> None:
    """Raise a one-line BenchError, naming the reason, unless `model` is a timm VisionTransformer made of
    standard blocks whose tokens tokenbench can reduce."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    kind = type(model).__name__
    if kind in REFUSED_FAMILIES:
        raise BenchError(f"{kind} is not supported: {REFUSED_FAMILIES[kind]}. Supported: {SUPPORTED_FAMILIES}")
    if not isinstance(model, VisionTransformer):
        raise BenchError(f"{kind} is not a Vision Transformer with a token sequence tokenbench can reduce. "
                         f"Supported: {SUPPORTED_FAMILIES}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise BenchError(
                f"block {i} of this model is {type(blk).__name__} with {type(blk.attn).__name__}; "
                "tokenbench supports timm's standard Block with Attention")
    if model.attn_pool is not None and model.attn_pool.pos_embed is not None:
        raise BenchError("this attention-pool head adds a position embedding per token, which reduced tokens "
                         "cannot follow; SigLIP's head (no position embedding) is supported")


class TokenReducedViT(nn.Module):
    """A timm ViT with a reducer on some of its blocks; shares the wrapped model's weights.

    `reducers` maps block index to reducer. With no reducers the output equals the wrapped model's
    exactly (same kernels in the same order), which the conformance tests check for every method.
    """

    def __init__(self, vit: nn.Module, reducers: dict[int, TokenReducer] | None = None,
                 proportional_attention: bool = True):
        super().__init__()
        check_vit(vit)
        reducers = reducers or {}
        depth = len(vit.blocks)
        for i in reducers:
            if not 0 <= i < depth:
                raise BenchError(f"reduction at block {i}, but the model has {depth} blocks")
        self.vit = vit
        self.proportional_attention = proportional_attention
        self.blocks = nn.ModuleList(ReducibleBlock(b, i, reducers.get(i)) for i, b in enumerate(vit.blocks))
        for i, reducer in reducers.items():
            if Need.RECEIVED in reducer.needs:
                if reducer.position is not Position.BEFORE_BLOCK or i == 0 or reducers.get(i - 1) is not None:
                    raise BenchError(f"block {i}: Need.RECEIVED is for a BEFORE_BLOCK reducer after a block that "
                                     "does not reduce (its attention must match this block's input)")
                self.blocks[i - 1].exports_received = True
        self._trace = False
        self._embed_macs = embed_macs(vit.patch_embed)
        self._final_norm = norm_macs_per_token(vit.norm)
        self._head_norm = norm_macs_per_token(vit.fc_norm)  # average-pooling models (VideoMAE) norm the pool
        heads = (vit.head, getattr(vit, "head_dist", None))  # distilled DeiT runs two heads
        self._head_macs = sum(linear_macs_per_token(h) for h in heads if h is not None) + self._head_norm
        self._pool_macs_per_token = 0
        attn_pool = vit.attn_pool  # SigLIP's MAP head: latent queries attend over the final tokens
        if attn_pool is not None:
            queries, width = attn_pool.latent_len, attn_pool.latent_dim
            self._pool_macs_per_token = linear_macs_per_token(attn_pool.kv) + 2 * queries * width
            pool_norm = norm_macs_per_token(attn_pool.norm) * queries
            self._head_macs += (linear_macs_per_token(attn_pool) - linear_macs_per_token(attn_pool.kv)) * queries + pool_norm
            self._head_norm += pool_norm

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def cls_substitute(self) -> str | None:
        """What stands in for class-token attention here (for the results row), or None if nothing does."""
        needed = any(b.reducer is not None and Need.CLS_ATTN in b.reducer.needs for b in self.blocks)
        return CLS_SUBSTITUTE if needed and self.vit.cls_token is None else None

    @torch.inference_mode()
    def trace(self, images: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Which input patches each token stands for, after every block whose decision changed the tokens.

        [(block index, source [B, tokens, patches])]: a row of source is one token; a patch it holds is > 0
        (a merged token holds several, a dropped patch is held by none). A weighted merge (vid-TLDR's saliency,
        EViT's fusion, plain means) scales each patch by its token's weight per unit of size, so a token
        merged with weight 0 (vid-TLDR's background) leaves its patches held by none, as the official traces
        do. `visualize` and the tests read it.
        """
        self._trace = True
        try:
            state = self._forward_tokens(images)[1]
        finally:
            self._trace = False
        return state.stages

    def _forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, TokenState]:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        state = TokenState(prefix=vit.num_prefix_tokens, class_token=vit.cls_token is not None,
                           proportional_attention=self.proportional_attention)
        if self._trace:
            patches = x.shape[1] - state.prefix
            eye = torch.eye(patches, device=x.device)
            state.source = torch.cat([x.new_zeros(state.prefix, patches), eye]).expand(x.shape[0], -1, -1)
        for reducer in dict.fromkeys(b.reducer for b in self.blocks if b.reducer is not None):
            reducer.begin(x, state)
        start, depth, key = 0, self._plain_prefix(), None
        store = active_store() if depth and self._may_reuse(state) else None
        if store is not None and (key := store.key(vit, images)) is not None:
            start, stored = store.nearest(key, depth)
            if stored is not None:
                x = stored
                self._charge_skipped(start, x.shape[1])
        for i in range(start, len(self.blocks)):
            if key is not None and i == depth and depth > start:
                store.keep(vit, key, depth, x)
            x = self.blocks[i](x, state)
        x = vit.norm(x)
        ledger = active_ledger()
        if ledger is not None:
            ledger.add(self._embed_macs + self._head_macs, self._head_norm)
            n = state.valid_counts(x)
            ledger.add(self._final_norm * n, self._final_norm * n)
            if self._pool_macs_per_token:
                ledger.add(self._pool_macs_per_token * n)
        return x, state

    def _plain_prefix(self) -> int:
        """How many blocks run before the first one a reducer changes (or asks to export attention for)."""
        return next((i for i, b in enumerate(self.blocks) if b.reducer is not None or b.exports_received),
                    len(self.blocks))

    def _may_reuse(self, state: TokenState) -> bool:
        """Whether the prefix is the plain model's: evaluation without gradients, tokens untouched by `begin`,
        and no trace or kernel log that the skipped blocks would have written to."""
        untouched = all(v is None for v in (state.size, state.mask, state.key_gate, state.received, state.source))
        return untouched and not self.training and not torch.is_grad_enabled() and not kernel_log_active()

    def _charge_skipped(self, blocks: int, tokens: int) -> None:
        ledger = active_ledger()
        if ledger is not None:
            for blk in self.blocks[:blocks]:
                ledger.add_block(blk.cost, tokens, tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, state = self._forward_tokens(images)
        return classify(self.vit, x, state)


def classify(vit: nn.Module, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Logits from the final tokens by timm's own head (distilled DeiT averages its class and distillation
    heads). Once tokens were reduced, average pooling weighs them by size and mask, and an attention-pool
    head (SigLIP) attends over them with the blocks' bias (log size, padding masked)."""
    reduced = state.size is not None or state.mask is not None
    if vit.attn_pool is not None and reduced:
        bias = attention_bias(state, x.dtype)
        if bias is not None and bias.any():  # a zero bias (every size 1) is timm's own head, same kernel
            return vit.head(vit.head_drop(vit.fc_norm(vit.attn_pool(x, attn_mask=bias))))
        return vit.forward_head(x)
    if vit.global_pool == "token" or not reduced:
        return vit.forward_head(x)
    return vit.head(vit.head_drop(vit.fc_norm(pool(vit, x, state))))


def pool(vit: nn.Module, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """The model's own pooling, made size- and mask-aware for average pooling."""
    if vit.global_pool == "token" or (state.size is None and state.mask is None):
        return vit.pool(x)
    if vit.global_pool != "avg":
        raise BenchError(f"pooling {vit.global_pool!r} is not supported with token reduction")
    start = 0 if vit.pool_include_prefix else state.prefix
    weight = torch.ones_like(x[..., :1]) if state.size is None else state.size.to(x.dtype)
    if state.mask is not None:
        weight = weight * state.mask[..., None]
    weight = weight[:, start:]
    return (x[:, start:] * weight).sum(1) / weight.sum(1)
