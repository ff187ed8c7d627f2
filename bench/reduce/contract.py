"""The method author's contract: what a reducer may ask for (`Need`), where it runs (`Position`), the token
state it reads, and the decisions it returns (`Prune`, `Merge`, `Propagate`, `Gate`); the engine applies them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn as nn


class Need(enum.Flag):
    """What a reducer asks its block's attention to hand over (`AttentionInfo`)."""

    NOTHING = 0
    CLS_ATTN = enum.auto()  # the class token's softmax attention row, from q_cls and K only (or its substitute)
    KEYS = enum.auto()
    VALUES = enum.auto()
    LOGITS = enum.auto()  # the full pre-softmax N x N map (forces the unfused path)
    RECEIVED = enum.auto()  # BEFORE_BLOCK only: the attention each token received in the previous block
    PLAIN_WEIGHTS = enum.auto()  # the softmax map without the size bias (vid-TLDR's saliency; forces the unfused path)
    WEIGHTS = enum.auto()  # the N x N softmax map the block used, bias and gates included (forces the unfused path)


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
    `key_gate` [B, N] float (training only, set by `Gate(in_attention=True)`): each key's exponentiated logit
    is multiplied by its gate before the softmax normalises, so gradients reach the gates.
    """

    prefix: int
    class_token: bool = True
    proportional_attention: bool = True
    received: torch.Tensor | None = None
    size: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    source: torch.Tensor | None = None
    key_gate: torch.Tensor | None = None
    stages: list = field(default_factory=list)  # traced (block index, source) after each applied decision

    def valid_counts(self, x: torch.Tensor):
        """Tokens per image: an int when all images keep the same number, else a [B] tensor."""
        return x.shape[1] if self.mask is None else self.mask.sum(1)


@dataclass
class AttentionInfo:
    """What a reducer may ask the attention of its block to return."""

    cls_attn: torch.Tensor | None = None  # [B, H, N] softmax attention of token 0 (the class token), or its substitute
    received: torch.Tensor | None = None  # [B, N] attention received in the previous block (Need.RECEIVED)
    weights: torch.Tensor | None = None  # [B, H, N, N] softmax attention map (Need.WEIGHTS, ONE_STEP_AHEAD reducers)
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
    `valid` ([B, K] bool): images keep different numbers of tokens (LTMP's thresholds); False marks padding
    slots, masked from then on. A merge of tokens that are already padded must give `valid`, and list the
    padding tokens in `merged` as `dropped`; a token that is kept and also listed as dropped stays kept.
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
    valid: torch.Tensor | None = None


@dataclass(kw_only=True)
class Propagate(Decision):
    """Keep the prefix tokens and the patch tokens at `keep` ([B, K] indices among the patch tokens), each plus
    a weighted sum of the patch tokens at `donors` ([B, M] indices): token k becomes
    x[keep[k]] + weight[k] @ x[donors] (`weight` [B, K, M], GTP's propagation over a token graph). With `keep`
    None the output patch tokens are `weight @ x[donors]` alone, K new tokens (DCT's low-pass).

    Sizes follow the same sums. The trace keeps each kept token's own patches (a donor's patches spread
    over several tokens are held by none); new tokens (`keep` None) hold no patch.
    """

    keep: torch.Tensor | None
    donors: torch.Tensor
    weight: torch.Tensor


@dataclass(kw_only=True)
class Gate(Decision):
    """Training only: scale every token by `gate` ([B, N] in [0, 1]) and mask those below 0.5 out of attention.

    `in_attention`: leave the tokens as they are; the gate multiplies each key's exponentiated logit instead,
    renormalised with a small eps (the `softmax_with_mask` of LTMP's official training), so that gradients
    reach the gates of tokens already masked.
    """

    gate: torch.Tensor
    in_attention: bool = False


class TokenReducer(nn.Module):
    """Base class of a per-block reducer: set `needs` and `position`, implement `decide`.

    `decide(x, state, info)` returns a `Decision`, a list of them (applied in order) or None (nothing
    changes). `x` is the block's tokens at
    the reducer's position, `state` the shared `TokenState` (read only), `info` what `needs` asked for.
    A `QUERIES` reducer (ATS) decides from the class-token attention and values before the rest of
    attention runs, and must return a `Prune`; only the kept tokens are then computed as queries.
    """

    needs: Need = Need.NOTHING
    position: Position = Position.AFTER_ATTENTION

    def begin(self, x: torch.Tensor, state: TokenState) -> None:
        """Called once per forward with the embedded tokens, before block 0: a reducer that carries per-image
        state across blocks (GTP's token graph) sets it up here. The default does nothing."""

    def decide(self, x: torch.Tensor, state: TokenState, info: AttentionInfo) -> Decision | list[Decision] | None:
        raise NotImplementedError
