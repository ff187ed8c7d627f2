"""Shared machinery for block-level token reduction on any timm VisionTransformer.

`TokenReducedViT` wraps a timm `VisionTransformer` without forking or mutating it: it reuses the
model's own modules and runs each block as a `ReducibleBlock`, which computes attention itself (fused
`scaled_dot_product_attention`, with optional size bias and padding mask) and hands the result to a
`TokenReducer`. The reducer either runs after attention and its residual, before the MLP (EViT, top-k,
random, ATS, ToMe), or before the block (DynamicViT). Token bookkeeping shared by all methods lives
in `TokenState`: per-token sizes for merging, a validity mask for per-image token counts, and the map
from current tokens back to the input patches for visualisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.ledger import BlockCost, active_ledger, embed_macs, linear_macs_per_token, norm_macs_per_token
from bench.registry import BenchError


@dataclass
class TokenState:
    """What the blocks of one forward pass share about the current tokens.

    `size` [B, N, 1]: how many input patches each token stands for (None: all ones).
    `mask` [B, N] bool: which tokens are real when images keep different numbers (None: all real).
    `source` [B, N, P]: which input patches each token stands for, kept only when `trace` is set.
    `class_token`: False for models without one (VideoMAE), where `cls_attn` is a substitute (see `run_attention`).
    """

    prefix: int
    class_token: bool = True
    size: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    source: torch.Tensor | None = None
    trace: bool = False
    stages: list = field(default_factory=list)  # traced `source` maps after each reduction

    def valid_counts(self, x: torch.Tensor):
        """Tokens per image: an int when all images keep the same number, else a [B] tensor."""
        return x.shape[1] if self.mask is None else self.mask.sum(1)


@dataclass
class AttentionInfo:
    """What a reducer may ask the attention of its block to return."""

    cls_attn: torch.Tensor | None = None  # [B, H, N] softmax attention of token 0 (the class token), or its substitute
    keys: torch.Tensor | None = None  # [B, H, N, d]
    values: torch.Tensor | None = None  # [B, H, N, d]
    logits: torch.Tensor | None = None  # [B, H, N, N] pre-softmax attention logits (with bias)
    query_index: torch.Tensor | None = None  # [B, K] the tokens a selecting reducer kept as queries


class TokenReducer(nn.Module):
    """Base class of a per-block reducer. Subclasses set `needs` and implement `forward`.

    `needs` names the `AttentionInfo` fields to compute. `before_block` reducers run on the block
    input and get no attention info. `forward(x, state, info)` returns the reduced tokens and updates
    `state` (size, mask, source) to match. A `selects_queries` reducer (ATS) implements `select`
    instead: it picks the tokens to keep from the class-token attention and values, before the rest of
    attention runs, so that only the kept tokens are computed as queries.
    """

    needs: frozenset = frozenset()
    before_block: bool = False
    selects_queries: bool = False

    def forward(self, x: torch.Tensor, state: TokenState, info: AttentionInfo) -> torch.Tensor:
        raise NotImplementedError

    def select(self, state: TokenState, info: AttentionInfo) -> torch.Tensor:
        """[B, K] indices of the tokens to keep (prefix included); updates `state` to match."""
        raise NotImplementedError


def attention_bias(state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias from token state: log(size) on keys (proportional attention), -inf on padding."""
    bias = None
    if state.size is not None:
        bias = state.size.log()[:, None, None, :, 0].to(dtype)
    if state.mask is not None:
        pad = torch.zeros(state.mask.shape, dtype=dtype, device=state.mask.device)
        pad = pad.masked_fill(~state.mask, float("-inf"))[:, None, None, :]
        bias = pad if bias is None else bias + pad
    return bias


CLS_SUBSTITUTE = "mean attention received"


def substitutes_cls(needs: frozenset, state: TokenState | None) -> bool:
    """Whether `cls_attn` is needed from a model without a class token, so a substitute stands in."""
    return "cls_attn" in needs and state is not None and not state.class_token


def separate_cls_row(attn: nn.Module, needs: frozenset, selecting: bool, state: TokenState | None = None) -> bool:
    """Whether `run_attention` computes the class token's attention as its own q_cls K^T row."""
    return ("cls_attn" in needs and not substitutes_cls(needs, state)
            and (selecting or (attn.fused_attn and "logits" not in needs)))


def mean_attention_received(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, H, N]: the attention each token receives, averaged over the (real) queries of [B, H, N, N] weights."""
    if mask is None:
        return weights.mean(dim=2)
    real = mask[:, None, :, None].to(weights.dtype)
    return (weights * real).sum(dim=2) / real.sum(dim=2)


def run_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, needs: frozenset, select=None,
                  state: TokenState | None = None):
    """timm `Attention.forward`, plus what a reducer needs, computed without materialising N x N maps.

    `select(info)`, if given, returns [B, K] indices of the tokens to keep as queries, chosen from
    `info` before the rest of attention runs; the output then has those K tokens only.
    A model without a class token (`state.class_token` False, e.g. VideoMAE) has no class-token row to
    give as `cls_attn`; the substitute is the attention each token receives averaged over all queries,
    which needs the full N x N map: it is computed once and also gives this block's output.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    info = AttentionInfo()
    if "keys" in needs:
        info.keys = k
    if "values" in needs:
        info.values = v
    separate = separate_cls_row(attn, needs, select is not None, state)
    logits = weights = None
    if substitutes_cls(needs, state):
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        weights = logits.softmax(dim=-1)
        info.cls_attn = mean_attention_received(weights, state.mask)
    elif separate:
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        info.cls_attn = logits.softmax(dim=-1)[:, :, 0]
    if select is not None:
        info.query_index = select(info)
        q = q.gather(2, info.query_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        x = gather_tokens(x, info.query_index)
        if weights is not None:
            rows = info.query_index[:, None, :, None].expand(-1, weights.shape[1], -1, weights.shape[-1])
            logits, weights = logits.gather(2, rows), weights.gather(2, rows)
    if weights is None and attn.fused_attn and "logits" not in needs:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        if weights is None:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            weights = attn.attn_drop(logits.softmax(dim=-1))
            if "cls_attn" in needs and not separate:
                info.cls_attn = weights[:, :, 0]
        else:
            weights = attn.attn_drop(weights)
        out = weights @ v
        info.logits = logits if "logits" in needs else None
    out = out.transpose(1, 2).reshape(B, q.shape[2], attn.attn_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), info


class ReducibleBlock(nn.Module):
    """A timm `Block` run with token state, an optional reducer and ledger bookkeeping."""

    def __init__(self, block: nn.Module, reducer: TokenReducer | None = None):
        super().__init__()
        self.block = block
        self.reducer = reducer
        self.cost = BlockCost.of(block)

    def forward(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        blk, reducer = self.block, self.reducer
        if reducer is not None and reducer.before_block:
            x = reducer(x, state, AttentionInfo())
        n_attn = state.valid_counts(x)
        needs = frozenset() if reducer is None or reducer.before_block else reducer.needs
        selecting = reducer is not None and reducer.selects_queries
        select = (lambda info: reducer.select(state, info)) if selecting else None
        bias = attention_bias(state, x.dtype)
        attn_out, info = run_attention(blk.attn, blk.norm1(x), bias, needs, select, state)
        if selecting:
            x = gather_tokens(x, info.query_index)
        x = x + blk.drop_path1(blk.ls1(attn_out))
        if reducer is not None and not reducer.before_block and not selecting:
            x = reducer(x, state, info)
        ledger = active_ledger()
        if ledger is not None:
            n_out = state.valid_counts(x)
            ledger.add_block(self.cost, n_attn, n_out, n_out if selecting else None)
            if separate_cls_row(blk.attn, needs, selecting, state):  # the extra q_cls K^T row
                ledger.add(blk.attn.attn_dim * n_attn)
            elif selecting and substitutes_cls(needs, state):  # Q K^T of the queries not kept
                ledger.add(blk.attn.attn_dim * n_attn * (n_attn - n_out))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        if state.mask is not None:
            x = x * state.mask[..., None]
        return x


def check_vit(model: nn.Module) -> None:
    """Raise a clear error unless `model` is a timm VisionTransformer made of standard blocks."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise BenchError(f"{type(model).__name__} is not a timm VisionTransformer; token reduction needs one")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise BenchError(
                f"block {i} of this model is {type(blk).__name__} with {type(blk.attn).__name__}; "
                "tokenbench supports timm's standard Block with Attention")
    if model.attn_pool is not None:
        raise BenchError("attention-pool heads are not supported; use a class-token or average-pool ViT")


class TokenReducedViT(nn.Module):
    """A timm ViT with a reducer on some of its blocks; shares the wrapped model's weights.

    `reducers` maps block index to reducer. With no reducers the output equals the wrapped model's
    exactly (same kernels in the same order), which the conformance tests check for every method.
    """

    def __init__(self, vit: nn.Module, reducers: dict[int, TokenReducer] | None = None, trace: bool = False):
        super().__init__()
        check_vit(vit)
        reducers = reducers or {}
        depth = len(vit.blocks)
        for i in reducers:
            if not 0 <= i < depth:
                raise BenchError(f"reduction at block {i}, but the model has {depth} blocks")
        self.vit = vit
        self.blocks = nn.ModuleList(ReducibleBlock(b, reducers.get(i)) for i, b in enumerate(vit.blocks))
        self.trace = trace
        self.last_state: TokenState | None = None
        self._embed_macs = embed_macs(vit.patch_embed)
        self._final_norm = norm_macs_per_token(vit.norm)
        self._head_norm = norm_macs_per_token(vit.fc_norm)  # average-pooling models (VideoMAE) norm the pool
        self._head_macs = linear_macs_per_token(vit.head) + self._head_norm

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def cls_substitute(self) -> str | None:
        """What stands in for class-token attention here (for the results row), or None if nothing does."""
        needed = any(b.reducer is not None and "cls_attn" in b.reducer.needs for b in self.blocks)
        return CLS_SUBSTITUTE if needed and self.vit.cls_token is None else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        state = TokenState(prefix=vit.num_prefix_tokens, class_token=vit.cls_token is not None, trace=self.trace)
        if self.trace:
            patches = x.shape[1] - state.prefix
            eye = torch.eye(patches, device=x.device)
            state.source = torch.cat([x.new_zeros(state.prefix, patches), eye]).expand(x.shape[0], -1, -1)
        for blk in self.blocks:
            x = blk(x, state)
        x = vit.norm(x)
        ledger = active_ledger()
        if ledger is not None:
            ledger.add(self._embed_macs + self._head_macs, self._head_norm)
            n = state.valid_counts(x)
            ledger.add(self._final_norm * n, self._final_norm * n)
        if self.trace:
            self.last_state = state
        x = pool(vit, x, state)
        return vit.head(vit.head_drop(vit.fc_norm(x)))


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


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, i]] for [B, N, ...] tokens and [B, K] indices."""
    B, N, *rest = x.shape
    # Whole-row copies (index_select) are several times faster on CPU than an element-wise gather.
    return x.reshape(B * N, *rest).index_select(0, flat_rows(index, N)).view(B, index.shape[1], *rest)


def flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """[B, K] token indices into rows of the [B * n, ...] flattened batch."""
    return (index + n * torch.arange(index.shape[0], device=index.device)[:, None]).flatten()


def keep_tokens(x: torch.Tensor, state: TokenState, keep: torch.Tensor) -> torch.Tensor:
    """Keep the prefix tokens and the patch tokens at `keep` ([B, K] indices among the non-prefix tokens).

    Updates size, mask and source of `state` to follow the kept tokens.
    """
    index = with_prefix(keep, state.prefix)
    follow_tokens(state, index)
    return gather_tokens(x, index)


def with_prefix(keep: torch.Tensor, prefix: int) -> torch.Tensor:
    """Token indices [B, prefix + K] of the prefix tokens followed by patch tokens `keep` ([B, K])."""
    front = torch.arange(prefix, device=keep.device).expand(keep.shape[0], prefix)
    return torch.cat([front, keep + prefix], dim=1)


def follow_tokens(state: TokenState, index: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Make size, mask and source of `state` follow the tokens at `index` ([B, K] token indices).

    `mask` ([B, K] bool), if given, becomes the new mask: False marks padding slots of images that
    kept fewer tokens than the batch's widest (their source rows are cleared).
    """
    if state.size is not None:
        state.size = gather_tokens(state.size, index)
    if mask is not None:
        state.mask = mask
    elif state.mask is not None:
        state.mask = state.mask.gather(1, index)
    if state.source is not None:
        state.source = gather_tokens(state.source, index)
        if mask is not None:
            state.source = state.source * mask[..., None]
        state.stages.append(state.source)


class KeepRateReducer(TokenReducer):
    """Keep ceil(keep_rate * n) of the n patch tokens with the highest `score` (EViT's schedule).

    Subclasses define `score(x, state, info) -> [B, n]`. Keeping every token is a no-op that leaves the
    token order alone, so the dense result is reproduced exactly.
    """

    def __init__(self, keep_rate: float):
        super().__init__()
        self.keep_rate = keep_rate

    def score(self, x: torch.Tensor, state: TokenState, info: AttentionInfo) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, state, info):
        n = x.shape[1] - state.prefix
        k = keep_count(self.keep_rate, n)
        if k == n:
            return x
        return keep_tokens(x, state, self.score(x, state, info).topk(k, dim=1).indices)


def keep_count(keep_rate: float, n: int) -> int:
    """EViT's rule: ceil(keep_rate * n) of the n current patch tokens (n includes an earlier fused token)."""
    return min(n, math.ceil(keep_rate * n))


def default_reduction_blocks(depth: int) -> tuple[int, ...]:
    """The papers' stages: blocks 3, 6, 9 of a 12-block model (every quarter of the depth, 0-indexed)."""
    step = depth // 4
    return (step, 2 * step, 3 * step) if step else ()
