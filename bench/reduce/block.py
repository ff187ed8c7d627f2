"""`ReducibleBlock`: one timm block run with token state; it asks its reducer for a decision and applies it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.errors import BenchError
from tokenbench.reduce.attention import attention_bias, note_kernel, run_attention, separate_cls_row, substitutes_cls
from tokenbench.reduce.contract import (
    AttentionInfo,
    Decision,
    Gate,
    Merge,
    Need,
    Position,
    Propagate,
    Prune,
    TokenReducer,
    TokenState,
)
from tokenbench.reduce.ledger import BlockCost, active_ledger
from tokenbench.reduce.ops import (
    apply_merge,
    apply_propagate,
    apply_prune,
    check_decision,
    follow_prune,
    gather_tokens,
    merge_attention_map,
)

APPLIED = (Prune, Merge, Propagate, Gate)  # the decisions the engine applies


class ReducibleBlock(nn.Module):
    """A timm `Block` run with token state and an optional reducer, whose decision it applies."""

    def __init__(self, block: nn.Module, index: int, reducer: TokenReducer | None = None):
        super().__init__()
        self.block = block
        self.index = index
        self.reducer = reducer
        self.cost = BlockCost.of(block)
        self.exports_received = False  # set when the next block's reducer needs `Need.RECEIVED`

    def apply_decision(self, x: torch.Tensor, state: TokenState, decision: Decision | list | None) -> torch.Tensor:
        """Apply `decision` (or each of a list, in order) to the tokens `x` and to `state`; charge its MACs;
        trace it."""
        if decision is None:
            return x
        if isinstance(decision, (list, tuple)):
            for one in decision:
                x = self.apply_decision(x, state, one)
            return x
        if not isinstance(decision, APPLIED):
            kinds = ", ".join(kind.__name__ for kind in APPLIED[:-1]) + f" or {APPLIED[-1].__name__}"
            raise BenchError(f"{self.who()} returned {type(decision).__name__}, not a {kinds}")
        check_decision(decision, x, state, self.who())
        if isinstance(decision, Gate):
            self.account(decision, state, x.shape[-1], moved=False)
            if decision.in_attention:
                state.key_gate = decision.gate
                return x
            state.mask = decision.gate > 0.5
            return x * decision.gate[..., None]
        if isinstance(decision, Prune):
            x = apply_prune(x, state, decision)
        elif isinstance(decision, Merge):
            x = apply_merge(x, state, decision)
        elif isinstance(decision, Propagate):
            x = apply_propagate(x, state, decision)
        self.account(decision, state, x.shape[-1])
        return x

    def who(self) -> str:
        """The reducer, its method's module and this block, for errors about what it decided."""
        return f"{type(self.reducer).__name__} ({type(self.reducer).__module__}) at block {self.index}"

    def account(self, decision: Decision, state: TokenState, width: int, moved: bool = True) -> None:
        """Charge what deciding cost (and a fused token's weighted sum over `width` channels) to the ledger;
        trace the tokens' new map back to the patches when they moved."""
        ledger = active_ledger()
        if ledger is not None:
            ledger.add(decision.macs, decision.norm_macs)
            if isinstance(decision, Prune) and decision.fuse_index is not None:
                ledger.add(decision.fuse_index.shape[1] * width)
            if isinstance(decision, Propagate):  # the weighted sums of the donors, features and sizes
                ledger.add(decision.weight.shape[1] * decision.weight.shape[2] * (width + 1))
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
            raise BenchError(f"{self.who()} chooses queries: it must return a Prune without fusion")
        check_decision(decision, x, state, self.who())
        index = follow_prune(state, decision)
        self.account(decision, state, x.shape[-1])
        return index
