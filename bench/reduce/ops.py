"""Applying decisions to tokens and their state, once for every method: gather, prune, merge, follow."""

from __future__ import annotations

import torch

from tokenbench.errors import BenchError
from tokenbench.reduce.contract import Decision, Gate, Merge, Propagate, Prune, TokenState


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
    """Size-weighted merging as a Merge names it; sizes add up; `state` follows (its mask becomes `valid`)."""
    out = merge_tokens(x, state, decision)
    if decision.valid is not None:
        state.mask = decision.valid
        if state.source is not None:
            state.source = state.source * decision.valid[..., None]
    return out


def merge_tokens(x: torch.Tensor, state: TokenState, decision: Merge) -> torch.Tensor:
    if state.key_gate is not None:
        state.key_gate = state.key_gate.gather(1, decision.kept)
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


def apply_propagate(x: torch.Tensor, state: TokenState, decision: Propagate) -> torch.Tensor:
    """The prefix tokens, then each kept patch token plus its weighted sum of donors (or the sums alone)."""
    if state.mask is not None:
        raise BenchError("propagating tokens of images that keep different numbers of tokens is not supported")
    p, keep = state.prefix, decision.keep
    donors = decision.donors + p
    weight = decision.weight.to(x.dtype)
    out = weight @ gather_tokens(x, donors)
    size = torch.ones_like(x[..., :1]) if state.size is None else state.size
    new_size = weight.to(size.dtype) @ gather_tokens(size, donors)
    if keep is not None:
        out = gather_tokens(x, keep + p) + out
        new_size = gather_tokens(size, keep + p) + new_size
    state.size = torch.cat([size[:, :p], new_size], dim=1)
    if state.source is not None:
        kept = state.source.new_zeros(weight.shape[0], weight.shape[1], state.source.shape[2]) if keep is None \
            else gather_tokens(state.source, keep + p)
        state.source = torch.cat([state.source[:, :p], kept], dim=1)
    return torch.cat([x[:, :p], out], dim=1)


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
    if state.key_gate is not None:
        state.key_gate = state.key_gate.gather(1, index)
    if state.source is not None:
        state.source = gather_tokens(state.source, index)
        if mask is not None:
            state.source = state.source * mask[..., None]


def check_decision(decision: Decision, x: torch.Tensor, state: TokenState, who: str) -> None:
    """A BenchError naming `who` (reducer and block) and the rule broken if `decision` cannot apply to the
    [B, N, C] tokens `x`: shapes, integer indices and their ranges (one min/max per index tensor, not per
    element; the ranges are not checked while torch.compile traces)."""
    B, N = x.shape[:2]
    n = N - state.prefix

    def indices(name: str, t, high: int, cols: int | None = None, rows: int = B) -> None:
        wrong_cols = cols is not None and isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[1] != cols
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != rows or wrong_cols:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            want = f"[{rows}, {cols if cols is not None else 'K'}]"
            raise BenchError(f"{who}: {type(decision).__name__}.{name} must be {want} token indices, got {shape}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise BenchError(f"{who}: {type(decision).__name__}.{name} must hold integer indices, not {t.dtype}")
        if t.numel() and not torch.compiler.is_compiling():
            low, top = (int(v) for v in torch.stack([t.min(), t.max()]).tolist())
            if low < 0 or top >= high:
                raise BenchError(f"{who}: {type(decision).__name__}.{name} holds indices in [{low}, {top}], "
                                 f"outside [0, {high}) ({N} tokens, {state.prefix} of them prefix)")

    def per_token(name: str, t, cols: int) -> None:
        if t is not None and (t.ndim != 2 or tuple(t.shape) != (B, cols)):
            raise BenchError(f"{who}: {type(decision).__name__}.{name} must be [{B}, {cols}], got {tuple(t.shape)}")

    if isinstance(decision, Prune):
        indices("keep", decision.keep, n)
        per_token("valid", decision.valid, decision.keep.shape[1])
        if decision.fuse_index is not None:
            indices("fuse_index", decision.fuse_index, n)
            per_token("fuse_weight", decision.fuse_weight, decision.fuse_index.shape[1])
    elif isinstance(decision, Merge):
        indices("kept", decision.kept, N)
        indices("merged", decision.merged, N)
        indices("into", decision.into, decision.kept.shape[1], cols=decision.merged.shape[1])
        for name in ("weight", "passed_size"):
            per_token(name, getattr(decision, name), N)
        per_token("dropped", decision.dropped, decision.merged.shape[1])
        per_token("valid", decision.valid, decision.kept.shape[1])
        if state.mask is not None and decision.valid is None:
            raise BenchError(f"{who}: merging tokens of images that keep different numbers of tokens needs "
                             "Merge.valid (and the padding listed in merged as dropped)")
    elif isinstance(decision, Propagate):
        indices("donors", decision.donors, n)
        if decision.keep is not None:
            indices("keep", decision.keep, n)
        weight, m = decision.weight, decision.donors.shape[1]
        rows_ok = decision.keep is None or weight.shape[1] == decision.keep.shape[1]
        if weight.ndim != 3 or weight.shape[0] != B or weight.shape[2] != m or not rows_ok \
                or not weight.is_floating_point():
            raise BenchError(f"{who}: Propagate.weight must be [{B}, K, {m}] floating-point weights (K kept "
                             f"tokens), got {tuple(weight.shape)} {weight.dtype}")
    elif isinstance(decision, Gate):
        per_token("gate", decision.gate, N)
