"""Shared machinery for block-level token reduction on any timm VisionTransformer.

`TokenReducedViT` wraps a timm `VisionTransformer` without forking or mutating it: it reuses the
model's own modules and runs each block as a `ReducibleBlock`, which computes attention itself (fused
`scaled_dot_product_attention`, with optional size bias and padding mask) and asks the block's
`TokenReducer` for a decision. A reducer only decides: which tokens to keep (`Prune`), which to merge
into which (`Merge`), or which to mask out while training (`Gate`), plus the MACs its own scoring costs.
The block applies the decision, once for every method: it gathers or merges the tokens, keeps the
per-token sizes (proportional attention), the padding mask (per-image token counts), the map back to
the input patches (`trace`) and the FLOP ledger.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.errors import BenchError
from tokenbench.ledger import BlockCost, active_ledger, embed_macs, linear_macs_per_token, norm_macs_per_token


class Need(enum.Flag):
    """What a reducer asks its block's attention to hand over (`AttentionInfo`)."""

    NOTHING = 0
    CLS_ATTN = enum.auto()  # the class token's softmax attention row, from q_cls and K only (or its substitute)
    KEYS = enum.auto()
    VALUES = enum.auto()
    LOGITS = enum.auto()  # the full pre-softmax N x N map (forces the unfused path)
    RECEIVED = enum.auto()  # BEFORE_BLOCK only: the attention each token received in the previous block
    PLAIN_WEIGHTS = enum.auto()  # the softmax map without the size bias (vid-TLDR's saliency; forces the unfused path)


class Position(enum.Enum):
    """Where in the block a reducer decides."""

    AFTER_ATTENTION = "after attention and its residual, before the MLP"  # EViT, top-k, ToMe
    QUERIES = "inside attention: which tokens are computed as queries"  # ATS
    BEFORE_BLOCK = "before the block, from its input"  # DynamicViT
    ONE_STEP_AHEAD = "at the start of the block, from its own attention map, which is merged too"  # MCTF
    AFTER_BLOCK = "after the block's MLP, from the block's attention"  # VisionZip


@dataclass
class TokenState:
    """What the blocks of one forward pass share about the current tokens (reducers read it, never write it).

    `size` [B, N, 1]: how many input patches each token stands for (None: all ones).
    `mask` [B, N] bool: which tokens are real when images keep different numbers (None: all real).
    `source` [B, N, P]: which input patches each token stands for, kept only when tracing.
    `class_token`: False for models without one (VideoMAE), where `cls_attn` is a substitute (see `run_attention`).
    `proportional_attention`: whether sizes bias attention (ToMe); methods that track sizes only to weight
    their merges (PiToMe) or none at all (ToFu) turn it off.
    `received` [B, N]: the attention each token received in the last block that was asked for it (summed over
    heads and queries), for a `Need.RECEIVED` reducer of the next block.
    """

    prefix: int
    class_token: bool = True
    proportional_attention: bool = True
    received: torch.Tensor | None = None
    size: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    source: torch.Tensor | None = None
    stages: list = field(default_factory=list)  # traced (block index, source) after each applied decision

    def valid_counts(self, x: torch.Tensor):
        """Tokens per image: an int when all images keep the same number, else a [B] tensor."""
        return x.shape[1] if self.mask is None else self.mask.sum(1)


@dataclass
class AttentionInfo:
    """What a reducer may ask the attention of its block to return."""

    cls_attn: torch.Tensor | None = None  # [B, H, N] softmax attention of token 0 (the class token), or its substitute
    received: torch.Tensor | None = None  # [B, N] attention received in the previous block (Need.RECEIVED)
    weights: torch.Tensor | None = None  # [B, H, N, N] softmax attention map (ONE_STEP_AHEAD reducers)
    keys: torch.Tensor | None = None  # [B, H, N, d]
    values: torch.Tensor | None = None  # [B, H, N, d]
    logits: torch.Tensor | None = None  # [B, H, N, N] pre-softmax attention logits (with bias)
    plain_weights: torch.Tensor | None = None  # [B, H, N, N] softmax of the logits without the size bias


@dataclass(kw_only=True)
class Decision:
    """What a reducer decided, plus the MACs per image of deciding it (scoring, matching, a predictor)."""

    macs: float | torch.Tensor = 0
    norm_macs: float | torch.Tensor = 0  # the part of `macs` spent in norms (FlopCounterMode does not see it)


@dataclass(kw_only=True)
class Prune(Decision):
    """Keep the prefix tokens, then the patch tokens at `keep` ([B, K] indices among the patch tokens).

    `valid` ([B, K] bool): images keep different numbers; False marks padding slots, masked from then on.
    `fuse_index`, `fuse_weight` ([B, M]): append one token, the weighted sum of the patch tokens at
    `fuse_index` (EViT's fused token); it stands for all their patches.
    """

    keep: torch.Tensor
    valid: torch.Tensor | None = None
    fuse_index: torch.Tensor | None = None
    fuse_weight: torch.Tensor | None = None


@dataclass(kw_only=True)
class Merge(Decision):
    """Merge tokens: the output is the tokens at `kept` ([B, K] token indices, prefix included, in output
    order), and each token at `merged` ([B, M] token indices) is added into output position `into` ([B, M]).

    Every output token becomes the weighted mean of the tokens it absorbed, sum(w x) / (sum(w) + eps), with
    weights `weight` ([B, N] per token) or, by default, the tokens' sizes (ToMe); sizes add up either way, so
    with proportional attention later blocks give a merged token more attention (log size on its logits).
    `mlerp` (ToFu): rescale each output token to the largest norm among the tokens it absorbed, dividing by
    the norm its kept token had before merging (the official code's form).
    `passed_size` ([B, N] per token): the size each token passes on to its output token (vid-TLDR: its weight;
    DiffRate: its size times its similarity to its destination); by default sizes add up in full.
    `dropped`: entries of `merged` that are removed rather than merged (no feature, size or patch passes on),
    so one decision can prune some images and merge others; an image that only drops keeps its tokens as
    they were.
    `added` (VisionZip's contextual tokens): the kept token is not averaged in; the output is the kept token
    plus the plain mean of the tokens merged into it (unchanged when none is); `weight` and `eps` do not apply.
    """

    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor
    weight: torch.Tensor | None = None
    eps: float | torch.Tensor = 0.0  # or [B, K], one per output token
    mlerp: bool = False
    dropped: torch.Tensor | None = None  # [B, M] bool: these merged tokens are simply removed (PPT's pruning)
    added: bool = False  # VisionZip: each kept token plus the mean of the tokens merged into it
    passed_size: torch.Tensor | None = None


@dataclass(kw_only=True)
class Gate(Decision):
    """Training only: scale every token by `gate` ([B, N] in [0, 1]) and mask those below 0.5 out of attention."""

    gate: torch.Tensor


class TokenReducer(nn.Module):
    """Base class of a per-block reducer: set `needs` and `position`, implement `decide`.

    `decide(x, state, info)` returns a `Decision` or None (nothing changes). `x` is the block's tokens at
    the reducer's position, `state` the shared `TokenState` (read only), `info` what `needs` asked for.
    A `QUERIES` reducer (ATS) decides from the class-token attention and values before the rest of
    attention runs, and must return a `Prune`; only the kept tokens are then computed as queries.
    """

    needs: Need = Need.NOTHING
    position: Position = Position.AFTER_ATTENTION

    def decide(self, x: torch.Tensor, state: TokenState, info: AttentionInfo) -> Decision | None:
        raise NotImplementedError


def attention_bias(state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias from token state: log(size) on keys (proportional attention), -inf on padding."""
    bias = None
    if state.size is not None and state.proportional_attention:
        bias = state.size.log()[:, None, None, :, 0].to(dtype)
    if state.mask is not None:
        pad = torch.zeros(state.mask.shape, dtype=dtype, device=state.mask.device)
        pad = pad.masked_fill(~state.mask, float("-inf"))[:, None, None, :]
        bias = pad if bias is None else bias + pad
    return bias


CLS_SUBSTITUTE = "mean attention received"


def substitutes_cls(needs: Need, state: TokenState | None) -> bool:
    """Whether `cls_attn` is needed from a model without a class token, so a substitute stands in."""
    return Need.CLS_ATTN in needs and state is not None and not state.class_token


def separate_cls_row(attn: nn.Module, needs: Need, selecting: bool, state: TokenState | None = None) -> bool:
    """Whether `run_attention` computes the class token's attention as its own q_cls K^T row."""
    return (Need.CLS_ATTN in needs and not substitutes_cls(needs, state)
            and (selecting or (attn.fused_attn and Need.LOGITS not in needs)))


def mean_attention_received(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, H, N]: the attention each token receives, averaged over the (real) queries of [B, H, N, N] weights."""
    if mask is None:
        return weights.mean(dim=2)
    real = mask[:, None, :, None].to(weights.dtype)
    return (weights * real).sum(dim=2) / real.sum(dim=2)


_KERNEL_LOGS: list[set] = []  # active `attention_kernel_log`s
SDPA_BACKENDS = {0: "math", 1: "flash", 2: "memory-efficient", 3: "cudnn"}  # torch's SDPBackend values


@contextlib.contextmanager
def attention_kernel_log():
    """Collect the names of the attention kernels the blocks run while active: the backend torch's fused
    attention selects (`flash`, `memory-efficient`, `cudnn` or `math` on CUDA; `cpu-fused` or `math` on
    CPU) and `explicit` where tokenbench writes attention out (q k^T, softmax, times V) because a reducer
    needs the map. Proportional attention and padding masks become an additive mask, which rules out some
    kernels; this says which ran."""
    seen: set = set()
    _KERNEL_LOGS.append(seen)
    try:
        yield seen
    finally:
        _KERNEL_LOGS.remove(seen)


def note_kernel(q=None, k=None, v=None, mask=None) -> None:
    """Log the fused kernel torch selects for these inputs (as autocast would cast them), or `explicit`."""
    if not _KERNEL_LOGS:
        return
    if q is None:
        name = "explicit"
    else:
        device = q.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            mask = None if mask is None else mask.to(dtype)
        name = SDPA_BACKENDS.get(int(torch._fused_sdp_choice(q, k, v, mask, 0.0, False)), "other")
        name = "cpu-fused" if (device, name) == ("cpu", "flash") else name
    for log in _KERNEL_LOGS:
        log.add(name)


def run_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, needs: Need, select=None,
                  state: TokenState | None = None):
    """timm `Attention.forward`, plus what a reducer needs, computed without materialising N x N maps.

    Returns (output, info, query index). `select(info)`, if given, returns [B, K] indices of the tokens
    to keep as queries (prefix included), chosen from `info` before the rest of attention runs; the output
    then has those K tokens only.
    A model without a class token (`state.class_token` False, e.g. VideoMAE) has no class-token row to
    give as `cls_attn`; the substitute is the attention each token receives averaged over all queries,
    which needs the full N x N map: it is computed once and also gives this block's output.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    info = AttentionInfo()
    if Need.KEYS in needs:
        info.keys = k
    if Need.VALUES in needs:
        info.values = v
    separate = separate_cls_row(attn, needs, select is not None, state)
    logits = weights = query_index = None
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
        query_index = select(info)
        q = q.gather(2, query_index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        x = gather_tokens(x, query_index)
        if weights is not None:
            rows = query_index[:, None, :, None].expand(-1, weights.shape[1], -1, weights.shape[-1])
            logits, weights = logits.gather(2, rows), weights.gather(2, rows)
    if weights is None and attn.fused_attn and not needs & (Need.LOGITS | Need.PLAIN_WEIGHTS):
        note_kernel(q, k, v, bias)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        if weights is None:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            if Need.PLAIN_WEIGHTS in needs:
                info.plain_weights = logits.softmax(dim=-1)
            if bias is not None:
                logits = logits + bias
            weights = attn.attn_drop(logits.softmax(dim=-1))
            if Need.CLS_ATTN in needs and not separate:
                info.cls_attn = weights[:, :, 0]
        else:
            weights = attn.attn_drop(weights)
        note_kernel()
        out = weights @ v
        info.logits = logits if Need.LOGITS in needs else None
    out = out.transpose(1, 2).reshape(B, q.shape[2], attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), info, query_index


class ReducibleBlock(nn.Module):
    """A timm `Block` run with token state and an optional reducer, whose decision it applies."""

    def __init__(self, block: nn.Module, index: int, reducer: TokenReducer | None = None):
        super().__init__()
        self.block = block
        self.index = index
        self.reducer = reducer
        self.cost = BlockCost.of(block)
        self.exports_received = False  # set when the next block's reducer needs `Need.RECEIVED`

    def apply_decision(self, x: torch.Tensor, state: TokenState, decision: Decision | None) -> torch.Tensor:
        """Apply `decision` to the tokens `x` and to `state`; charge its MACs; trace it."""
        if decision is None:
            return x
        if isinstance(decision, Gate):
            self.account(decision, state, x.shape[-1], moved=False)
            state.mask = decision.gate > 0.5
            return x * decision.gate[..., None]
        if isinstance(decision, Prune):
            x = apply_prune(x, state, decision)
        elif isinstance(decision, Merge):
            x = apply_merge(x, state, decision)
        else:
            raise TypeError(f"{type(self.reducer).__name__} returned {type(decision).__name__}, not a Decision")
        self.account(decision, state, x.shape[-1])
        return x

    def account(self, decision: Decision, state: TokenState, width: int, moved: bool = True) -> None:
        """Charge what deciding cost (and a fused token's weighted sum over `width` channels) to the ledger;
        trace the tokens' new map back to the patches when they moved."""
        ledger = active_ledger()
        if ledger is not None:
            ledger.add(decision.macs, decision.norm_macs)
            if isinstance(decision, Prune) and decision.fuse_index is not None:
                ledger.add(decision.fuse_index.shape[1] * width)
        if moved and state.source is not None:
            state.stages.append((self.index, state.source))

    def forward(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        blk, reducer = self.block, self.reducer
        position = reducer.position if reducer is not None else None
        if position is Position.ONE_STEP_AHEAD:
            return self.forward_one_step_ahead(x, state)
        if position is Position.BEFORE_BLOCK:
            x = self.apply_decision(x, state, reducer.decide(x, state, AttentionInfo(received=state.received)))
        n_attn = state.valid_counts(x)
        asks = (Position.AFTER_ATTENTION, Position.QUERIES, Position.AFTER_BLOCK)
        needs = reducer.needs if position in asks else Need.NOTHING
        if self.exports_received:
            needs = needs | Need.LOGITS
        selecting = position is Position.QUERIES
        select = (lambda info: self.select_queries(x, state, info)) if selecting else None
        bias = attention_bias(state, x.dtype)
        attn_out, info, query_index = run_attention(blk.attn, blk.norm1(x), bias, needs, select, state)
        if self.exports_received:
            state.received = info.logits.softmax(dim=-1).sum(dim=1).sum(dim=1)  # over heads, then queries
        if selecting:
            x = gather_tokens(x, query_index)
        x = x + blk.drop_path1(blk.ls1(attn_out))
        if position is Position.AFTER_ATTENTION:
            x = self.apply_decision(x, state, reducer.decide(x, state, info))
        ledger = active_ledger()
        if ledger is not None:
            n_out = state.valid_counts(x)
            ledger.add_block(self.cost, n_attn, n_out, n_out if selecting else None)
            if separate_cls_row(blk.attn, needs, selecting, state):  # the extra q_cls K^T row
                ledger.add(blk.attn.num_heads * blk.attn.head_dim * n_attn)
            elif selecting and substitutes_cls(needs, state):  # Q K^T of the queries not kept
                ledger.add(blk.attn.num_heads * blk.attn.head_dim * n_attn * (n_attn - n_out))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        if state.mask is not None:
            x = x * state.mask[..., None]
        if position is Position.AFTER_BLOCK:
            x = self.apply_decision(x, state, reducer.decide(x, state, info))
        return x

    def forward_one_step_ahead(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """MCTF's block: the attention map of the unreduced tokens (queries and keys only) decides a Merge;
        the map is merged with the tokens (merged keys' probabilities add up, merged queries' rows are
        averaged with the Merge's weights), values come from the merged tokens, and the rest of the block
        runs on them. Costs: LN1 and Q, K on the tokens before, QK^T on them; V, AV, proj, MLP after."""
        blk, attn = self.block, self.block.attn
        if state.mask is not None:
            raise BenchError("one-step-ahead merging needs every image to keep the same number of tokens")
        B, n_in, C = x.shape
        width = attn.num_heads * attn.head_dim
        weight, bias = attn.qkv.weight, attn.qkv.bias
        qk = F.linear(blk.norm1(x), weight[:2 * width], None if bias is None else bias[:2 * width])
        q, k = qk.reshape(B, n_in, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        attn_bias = attention_bias(state, x.dtype)
        if attn_bias is not None:
            logits = logits + attn_bias
        weights = logits.softmax(dim=-1)
        note_kernel()
        decision = self.reducer.decide(x, state, AttentionInfo(weights=weights))
        if decision is not None:
            if not isinstance(decision, Merge) or decision.weight is None:
                raise TypeError(f"{type(self.reducer).__name__} decides one step ahead: it must return a weighted Merge")
            weights = merge_attention_map(weights, decision)
            x = self.apply_decision(x, state, decision)
        n = x.shape[1]
        v = F.linear(blk.norm1(x), weight[2 * width:], None if bias is None else bias[2 * width:])
        v = v.reshape(B, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        out = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(B, n, width)
        x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(out)))))
        ledger = active_ledger()
        if ledger is not None:
            cost = self.cost  # everything on the merged tokens, then what ran on the tokens before instead
            ledger.add_block(cost, n, n)
            qk_share = cost.attn_linear * 2 // 3
            extra_norm = cost.attn_norm * n_in
            ledger.add(extra_norm + qk_share * (n_in - n) + cost.attn_pair // 2 * (n_in * n_in - n * n), extra_norm)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def select_queries(self, x: torch.Tensor, state: TokenState, info: AttentionInfo) -> torch.Tensor:
        """[B, K] token indices a QUERIES reducer keeps (prefix included); `state` follows them."""
        decision = self.reducer.decide(x, state, info)
        if not isinstance(decision, Prune) or decision.fuse_index is not None:
            raise TypeError(f"{type(self.reducer).__name__} chooses queries: it must return a Prune without fusion")
        index = follow_prune(state, decision)
        self.account(decision, state, x.shape[-1])
        return index


def follow_prune(state: TokenState, decision: Prune) -> torch.Tensor:
    """Make `state` follow the tokens a Prune keeps; their token indices [B, prefix + K]."""
    index = with_prefix(decision.keep, state.prefix)
    mask = None
    if decision.valid is not None:
        valid = decision.valid
        mask = torch.cat([valid.new_ones(valid.shape[0], state.prefix), valid], dim=1)
    follow_tokens(state, index, mask)
    return index


def apply_prune(x: torch.Tensor, state: TokenState, decision: Prune) -> torch.Tensor:
    """Keep the tokens a Prune names (and append its fused token); `state` follows them."""
    p = state.prefix
    fused = fused_size = fused_source = None
    if decision.fuse_index is not None:
        dropped = decision.fuse_index + p
        fused = decision.fuse_weight[:, None, :] @ gather_tokens(x, dropped)  # [B, 1, C], one matmul
        if state.size is not None:
            fused_size = gather_tokens(state.size, dropped).sum(1, keepdim=True)
        if state.source is not None:
            fused_source = decision.fuse_weight[:, None, :].to(state.source.dtype) @ gather_tokens(state.source, dropped)
    x = gather_tokens(x, follow_prune(state, decision))
    if fused is None:
        return x
    if state.size is not None:
        state.size = torch.cat([state.size, fused_size], dim=1)
    if state.mask is not None:
        state.mask = torch.cat([state.mask, state.mask.new_ones(x.shape[0], 1)], dim=1)
    if state.source is not None:
        state.source = torch.cat([state.source, fused_source], dim=1)
    return torch.cat([x, fused], dim=1)


def apply_merge(x: torch.Tensor, state: TokenState, decision: Merge) -> torch.Tensor:
    """Size-weighted merging as a Merge names it; sizes add up; `state` follows."""
    if state.mask is not None:
        raise BenchError("merging tokens of images that keep different numbers of tokens is not supported")
    into = flat_rows(decision.into, decision.kept.shape[1])
    passes = None if decision.dropped is None else ~decision.dropped.flatten()

    def merge(t, kept_too=True):
        out = gather_tokens(t, decision.kept) if kept_too else t.new_zeros(t.shape[0], decision.kept.shape[1],
                                                                             *t.shape[2:])
        sources = gather_tokens(t, decision.merged).flatten(0, 1)
        if passes is not None:
            sources = sources * passes.view(-1, *[1] * (sources.dim() - 1)).to(sources.dtype)
        # index_put_ accumulates in one parallel pass; index_add_ stalls on shared, multi-threaded CPUs.
        out.view(-1, *t.shape[2:]).index_put_((into,), sources, accumulate=True)
        return out

    size = torch.ones_like(x[..., :1]) if state.size is None else state.size
    if decision.added:  # kept token + plain mean of the tokens merged into it (a count of 0 counts as 1)
        state.size = merge(size)
        if state.source is not None:
            state.source = merge(state.source)
        mean = merge(x, kept_too=False) / merge(torch.ones_like(size), kept_too=False).clamp(min=1)
        return gather_tokens(x, decision.kept) + mean
    weight = size if decision.weight is None else decision.weight[..., None].to(x.dtype)
    out = merge(x * weight if decision.weight is not None or state.size is not None else x)
    total = merge(weight)
    if decision.passed_size is not None:
        state.size = merge(decision.passed_size[..., None].to(size.dtype))
    else:
        state.size = total if decision.weight is None else merge(size)
    if state.source is not None:  # each patch counts with its token's merge weight per unit of size
        share = None if decision.weight is None else weight / size
        state.source = merge(state.source if share is None else state.source * share.to(state.source.dtype))
    eps = decision.eps
    if isinstance(eps, torch.Tensor):
        out = out / (total + eps[..., None].to(total.dtype))
    else:
        out = out / (total + eps) if eps else out / total
    if decision.mlerp:
        norms = x.norm(dim=-1)
        largest = norms.gather(1, decision.kept)
        largest.view(-1).scatter_reduce_(0, into, norms.gather(1, decision.merged).flatten(), "amax")
        out = out * (largest / norms.gather(1, decision.kept))[..., None]
    if decision.dropped is not None:  # images that only prune: their kept tokens exactly as they were
        out = torch.where(decision.dropped.all(dim=1)[:, None, None], gather_tokens(x, decision.kept), out)
    return out


def merge_attention_map(weights: torch.Tensor, decision: Merge) -> torch.Tensor:
    """[B, H, N, N] attention probabilities merged as `decision` merges the tokens: a merged key's probability
    is added to its destination's, a merged query's row is averaged in with the Merge's weights."""
    keep, merged, into = decision.kept, decision.merged, decision.into

    def merge_rows(t):  # [B, h, N, M] -> [B, h, K, M]: rows summed as the tokens merge
        index = lambda i: i[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])  # noqa: E731
        return t.gather(2, index(keep)).scatter_add(2, index(into), t.gather(2, index(merged)))

    w = decision.weight.to(weights.dtype)[:, None, :, None]
    keys = merge_rows(weights.transpose(-1, -2)).transpose(-1, -2)  # [B, H, N, K]: key columns summed
    return merge_rows(keys * w) / merge_rows(w)


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
        for blk in self.blocks:
            x = blk(x, state)
        x = vit.norm(x)
        ledger = active_ledger()
        if ledger is not None:
            ledger.add(self._embed_macs + self._head_macs, self._head_norm)
            n = state.valid_counts(x)
            ledger.add(self._final_norm * n, self._final_norm * n)
            if self._pool_macs_per_token:
                ledger.add(self._pool_macs_per_token * n)
        return x, state

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


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, i]] for [B, N, ...] tokens and [B, K] indices."""
    B, N, *rest = x.shape
    # Whole-row copies (index_select) are several times faster on CPU than an element-wise gather.
    return x.reshape(B * N, *rest).index_select(0, flat_rows(index, N)).view(B, index.shape[1], *rest)


def flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """[B, K] token indices into rows of the [B * n, ...] flattened batch."""
    return (index + n * torch.arange(index.shape[0], device=index.device)[:, None]).flatten()


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

    def decide(self, x, state, info):
        n = x.shape[1] - state.prefix
        k = keep_count(self.keep_rate, n)
        if k == n:
            return None
        return Prune(keep=self.score(x, state, info).topk(k, dim=1).indices)


def keep_count(keep_rate: float, n: int) -> int:
    """EViT's rule: ceil(keep_rate * n) of the n current patch tokens (n includes an earlier fused token)."""
    return min(n, math.ceil(keep_rate * n))


def stage_counts(n_patches: int, keep_rate: float, stages: int = 3) -> list[int]:
    """Tokens kept at each reduction stage by the clustering methods' rule (TokenReduction, ATC):
    int(n_patches * keep_rate ** s) for s = 1, 2, 3, always of the original patches (0.7 of 196: 137, 96, 67)."""
    return [max(1, int(n_patches * keep_rate ** (s + 1))) for s in range(stages)]


def default_reduction_blocks(depth: int) -> tuple[int, ...]:
    """The papers' stages: blocks 3, 6, 9 of a 12-block model (every quarter of the depth, 0-indexed)."""
    step = depth // 4
    return (step, 2 * step, 3 * step) if step else ()
