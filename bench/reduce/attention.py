"""Attention as the engine runs it: fused SDPA with size bias and padding mask, or the unfused path when a
reducer needs the map; what each reducer asked for comes back as `AttentionInfo`."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.reduce.contract import AttentionInfo, Need, TokenState
from tokenbench.reduce.ops import gather_tokens


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
EXPLICIT = Need.LOGITS | Need.PLAIN_WEIGHTS | Need.WEIGHTS  # needs that only the written-out attention can meet


def substitutes_cls(needs: Need, state: TokenState | None) -> bool:
    """Whether `cls_attn` is needed from a model without a class token, so a substitute stands in."""
    return Need.CLS_ATTN in needs and state is not None and not state.class_token


def separate_cls_row(attn: nn.Module, needs: Need, selecting: bool, state: TokenState | None = None) -> bool:
    """Whether `run_attention` computes the class token's attention as its own q_cls K^T row."""
    gated = state is not None and state.key_gate is not None
    return (Need.CLS_ATTN in needs and not substitutes_cls(needs, state) and not gated
            and (selecting or (attn.fused_attn and not needs & (Need.LOGITS | Need.WEIGHTS))))


def gated_softmax(logits: torch.Tensor, gate: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Softmax over keys with each key's exponentiated logit multiplied by its gate ([B, N], differentiable), then
    (w + eps / N) / (sum + eps) as LTMP's and DynamicViT's official training do, so a fully gated row stays finite."""
    w = (logits - logits.amax(dim=-1, keepdim=True)).exp() * gate[:, None, None, :].to(logits.dtype)
    return (w + eps / w.shape[-1]) / (w.sum(dim=-1, keepdim=True) + eps)


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


def kernel_log_active() -> bool:
    return bool(_KERNEL_LOGS)


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
    gate = None if state is None else state.key_gate
    if weights is None and attn.fused_attn and gate is None and not needs & EXPLICIT:
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
            weights = logits.softmax(dim=-1) if gate is None else gated_softmax(logits, gate)
            if Need.CLS_ATTN in needs and not separate:
                info.cls_attn = weights[:, :, 0]
        if Need.WEIGHTS in needs:
            info.weights = weights
        weights = attn.attn_drop(weights)
        note_kernel()
        out = weights @ v
        info.logits = logits if Need.LOGITS in needs else None
    out = out.transpose(1, 2).reshape(B, q.shape[2], attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), info, query_index
