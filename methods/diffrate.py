"""DiffRate: per-block pruning and merging counts, searched by gradient descent for a FLOPs target.

Inference, given per-block token counts P_b (prune) and M_b (merge), both counting the prefix tokens: after
attention (and its residual) in block b, the patch tokens are ranked by the class token's attention
averaged over heads (descending, `torch.sort`) behind the prefix tokens; the first P_b are kept. If fewer
than that, M_b, are to remain, the others merge into the M_b most important: each goes to its most
similar one (cosine of the residual stream; prefix tokens are never destinations; first on ties). A merged
token is the plain mean of its destination and sources (not size-weighted), and its size grows by each
source's size times its similarity to it (may shrink for a negative one; no clamp at inference).
Attention is proportional to the sizes. Block 0 never compresses. DeiT-S at the published 2.9 G rates
runs 197, 194, 176, ..., 56, 3 tokens (`PUBLISHED`).

The rates are the official searched ones for DeiT-S and DeiT-B (`gflops`, `PUBLISHED`), or come from
DiffRate's search (`search_rates`: the `calibrate` step, `tokenbench calibrate`). The backbone is frozen;
only each block's two distributions over candidate kept counts (every g-th count, g = patches // 49 at
least 1: the official 4 for 196 patches) are learned, from uniform. The expected count, ceiled with a
straight-through estimator, decides a 0/1 token mask whose gradient flows to the distribution through the
cumulative probabilities; masked tokens stay in the sequence but leave attention (masked softmax, the
diagonal kept), merging runs on the kept prefix with sizes clamped at 1, and the loss is cross-entropy plus
5 (FLOPs - target)^2 by the official FLOPs formula (4NC^2 + 2N^2C + 8N'C^2 per block, patch embedding and
head; the count after a block passes its gradient to both counts).
Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers", ICCV 2023
(official code: OpenGVLab/DiffRate, `DiffRate/patch/deit.py`, `ddp.py`, `merge.py`).

Deviations:
- search data: the held-out split given (tokenbench's val), not ImageNet train with DeiT augmentation,
  mixup and drop path (the model stays in eval mode); plain cross-entropy.
- search length: `SEARCH_STEPS` (200) steps at batch 32, not 3 epochs of ImageNet (about 3,750 steps at
  batch 1,024), so the learning rates are 10x the official (AdamW 0.1, cosine to 0.01) to let the
  distributions move as far; the counts are read from the final distributions.
- FLOPs units: the FLOPs term is in DeiT-S-sized units (4.6 G x the fraction of dense), so that λ = 5 weighs
  a small model's budget as the official code weighs DeiT-S's in GFLOPs. The `target` knob is a fraction of
  the dense model's FLOPs by that formula; the ledger's GMACs (LayerNorms and the method's matching
  included) are measured apart and land within about 0.01 of it.
- blocks that remove nothing keep their token order (the official code re-sorts them; a permutation changes
  no result, the next compressing block sorts anew).
- every prefix token is protected and first (the official code assumes one class token); without a class
  token the mean attention received stands in for its attention (as for EViT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenbench.reduce import (
    BenchError,
    Knob,
    Merge,
    Method,
    Need,
    Prune,
    TokenReducedViT,
    TokenReducer,
    TokenState,
    classify,
    gather_tokens,
    mean_attention_received,
    register_method,
    with_prefix,
)

SEARCH_STEPS = 200
SEARCH_BATCH = 32
SEARCH_LR = (0.1, 0.01)  # the official 0.01 -> 0.001 times 10: about 3,750 official steps against our 200
FLOPS_WEIGHT = 5.0  # the official λ
DEIT_S_GFLOPS = 4.6  # the unit of the FLOPs term: the official formula's dense DeiT-S


@dataclass(frozen=True)
class Rates:
    """Tokens kept per block after pruning (`prune`) and after merging (`merge`), prefix tokens included."""

    prune: tuple[int, ...]
    merge: tuple[int, ...]

    def tokens(self, n: int) -> list[int]:
        """Tokens after each block when n enter the first."""
        out = []
        for p, m in zip(self.prune, self.merge):
            n = min(n, p, m)
            out.append(n)
        return out


# compression_rate.json of the official repository: DeiT-S and DeiT-B (timm's deit_*_patch16_224), by GFLOPs.
PUBLISHED = {
    ("deit_small_patch16_224", 2.3): Rates((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3),
                                           (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)),
    ("deit_small_patch16_224", 2.5): Rates((197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3),
                                           (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3)),
    ("deit_small_patch16_224", 2.7): Rates((197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3),
                                           (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)),
    ("deit_small_patch16_224", 2.9): Rates((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
                                           (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
    ("deit_small_patch16_224", 3.1): Rates((197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3),
                                           (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3)),
    ("deit_base_patch16_224", 8.7): Rates((197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3),
                                          (197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3)),
    ("deit_base_patch16_224", 10.0): Rates((197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3),
                                           (197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3)),
    ("deit_base_patch16_224", 10.4): Rates((197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3),
                                           (197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3)),
    ("deit_base_patch16_224", 11.5): Rates((197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3),
                                           (197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3)),
    ("deit_base_patch16_224", 12.5): Rates((197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3),
                                           (197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3)),
}


class SortPruneMergeReducer(TokenReducer):
    """One block of DiffRate at inference: rank by class attention, keep `prune` tokens, merge down to `merge`."""

    needs = Need.CLS_ATTN

    def __init__(self, prune: int, merge: int):
        super().__init__()
        self.prune, self.merge = prune, merge

    def decide(self, x, state, info):
        p, n = state.prefix, x.shape[1]
        kept = min(n, self.prune)
        remain = min(kept, self.merge)
        if remain == n:
            return None
        order = info.cls_attn[:, :, p:].mean(dim=1).sort(dim=1, descending=True).indices  # [B, n - p]
        if remain == kept:
            return Prune(keep=order[:, :kept - p])
        ranked = with_prefix(order, p)[:, :kept]
        best, into = most_similar_important(gather_tokens(x, ranked), remain, p)
        size = torch.ones_like(x[..., 0]) if state.size is None else state.size[..., 0]
        sources = ranked[:, remain:]
        passed = size.scatter(1, sources, size.gather(1, sources) * best.to(size.dtype))
        return Merge(kept=ranked[:, :remain], merged=sources, into=into, weight=torch.ones_like(size),
                     passed_size=passed, macs=(kept - remain) * remain * x.shape[-1] + kept * x.shape[-1],
                     norm_macs=kept * x.shape[-1])  # the similarities, and normalising the features


def most_similar_important(tokens: torch.Tensor, remain: int, protected: int):
    """(cosine, index) of the most similar of the first `remain` tokens for each later one (first on ties), by
    the tokens' cosine similarity; the first `protected` are never chosen."""
    metric = tokens / tokens.norm(dim=-1, keepdim=True)
    similarity = metric[:, remain:] @ metric[:, :remain].transpose(1, 2)  # [B, sources, destinations]
    similarity[..., :protected] = -math.inf
    return similarity.max(dim=-1)


def with_rates(model, rates: Rates) -> TokenReducedViT:
    """`model` running DiffRate at the given per-block counts (e.g. `PUBLISHED[("deit_small_patch16_224", 2.9)]`)."""
    depth = len(model.blocks)
    if len(rates.prune) != depth or len(rates.merge) != depth:
        raise BenchError(f"diffrate: {len(rates.prune)} prune and {len(rates.merge)} merge counts for {depth} blocks")
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    reducers = {b: SortPruneMergeReducer(p, m) for b, (p, m) in enumerate(zip(rates.prune, rates.merge))
                if min(p, m) < n}
    return TokenReducedViT(model, reducers)


# ----------------------------------------------------------------------------------------------- the search

def formula_flops(model, kept: list):
    """The official FLOPs formula of `model` (all its tokens entering block 0) at (prune, merge) counts per
    block, including the patch embedding and the head; the count after a block is straight-through to both
    counts (their gradients flow, the entering count's not)."""
    n = float(model.patch_embed.num_patches + model.num_prefix_tokens)
    dim = model.embed_dim
    total = n * dim * model.patch_embed.proj.weight[0].numel() + dim * model.num_classes
    for prune, merge in kept:
        total = total + 4 * n * dim * dim + 2 * n * n * dim
        smallest = torch.minimum(torch.minimum(torch.as_tensor(n, dtype=prune.dtype), prune), merge).detach()
        n = smallest + (prune - prune.detach()) + (merge - merge.detach())
        total = total + 8 * n * dim * dim
    return total


class RateSearch(torch.nn.Module):
    """Each block's learned distributions over candidate kept counts (block 0: every token, not learned)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.prefix = vit.num_prefix_tokens
        self.patches = vit.patch_embed.num_patches
        g = max(1, self.patches // 49)
        self.register_buffer("candidates", torch.arange(self.patches, 0, -g, dtype=torch.float64))
        self.logits = torch.nn.Parameter(torch.zeros(len(vit.blocks) - 1, 2, len(self.candidates), dtype=torch.float64))
        positions = torch.arange(self.patches + self.prefix, dtype=torch.float64)
        self.register_buffer("covers", (positions[None, :] < (self.candidates[:, None] + self.prefix)).double())

    def expected(self) -> torch.Tensor:
        """[blocks - 1, 2]: ceil of the expected kept count (straight-through) plus the prefix tokens."""
        mean = self.logits.softmax(dim=-1) @ self.candidates
        return mean.ceil().detach() + mean - mean.detach() + self.prefix

    def token_mask(self, b: int, kind: int, kept: int, upto: int) -> torch.Tensor:
        """[N]: 0 at positions kept..upto-1, else 1; its gradient is that of each position's chance to be kept."""
        chance = self.logits[b - 1, kind].softmax(dim=-1) @ self.covers
        hard = torch.ones_like(chance)
        hard[kept:upto] = 0
        return hard - chance.detach() + chance

    def rates(self) -> Rates:
        n = self.patches + self.prefix
        counts = self.expected().detach().long().tolist()
        return Rates((n, *[c[0] for c in counts]), (n, *[c[1] for c in counts]))

    def forward(self, images: torch.Tensor):
        """(logits, official-formula FLOPs) of the masked model at the current expected counts."""
        vit, p = self.vit, self.prefix
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        B, N, _ = x.shape
        size = x.new_ones(B, N, 1)
        mask = x.new_ones(B, N)
        kept = self.expected().to(x.dtype)
        for b, blk in enumerate(vit.blocks):
            attn, out = masked_attention(blk.attn, blk.norm1(x), size, mask)
            x = x + blk.drop_path1(blk.ls1(out))
            if vit.cls_token is not None:
                importance = attn[:, :, 0, p:].mean(dim=1)
            else:  # the substitute for class attention, as at inference
                importance = mean_attention_received(attn, mask > 0.5).mean(dim=1)[:, p:]
            index = with_prefix(importance.sort(dim=1, descending=True).indices, p)
            x, size, mask = gather_tokens(x, index), gather_tokens(size, index), mask.gather(1, index)
            if b > 0:
                last = int(mask[0].sum())
                prune, merge = kept[b - 1]
                if prune < last:
                    mask = mask * self.token_mask(b, 0, int(prune), last).to(x.dtype)
                mid = min(last, int(prune))
                if merge < mid:
                    x, size = merge_masked(x, size, int(merge), mid, p)
                    mask = mask * self.token_mask(b, 1, int(merge), mid).to(x.dtype)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        x = vit.norm(x)
        state = TokenState(prefix=p, size=size, mask=mask > 0.5)
        logits = classify(vit, x, state)
        full = kept.new_tensor([N, N])  # block 0 keeps every token
        return logits, formula_flops(vit, [full, *kept])


def masked_attention(attn, x, size, mask, eps=1e-6):
    """The official training attention: log(size) on the keys, masked keys left out of every query's softmax
    except its own (a multiplicative mask, so its straight-through gradient reaches the counts)."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
    eye = torch.eye(N, dtype=x.dtype, device=x.device)
    keep = mask[:, None, None, :] + (1 - mask[:, None, None, :]) * eye
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * keep
    weights = (weights + eps / N) / (weights.sum(dim=-1, keepdim=True) + eps)
    out = (weights @ v).transpose(1, 2).reshape(B, N, -1)
    return weights, attn.proj(attn.norm(out))


def merge_masked(x, size, remain: int, mid: int, protected: int):
    """Merge positions remain..mid-1 into the first `remain` (mean features, similarity-scaled sizes clamped
    at 1); the sources stay in place, for the mask to remove."""
    best, into = most_similar_important(x[:, :mid].detach(), remain, protected)
    spread = into[..., None]
    merged = x[:, :remain].scatter_reduce(1, spread.expand(-1, -1, x.shape[-1]), x[:, remain:mid], "mean")
    scaled = torch.cat([size[:, :remain], size[:, remain:mid] * best[..., None]], dim=1).clamp(min=1)
    summed = scaled[:, :remain].scatter_reduce(1, spread, scaled[:, remain:], "sum")
    return (torch.cat([merged, x[:, remain:]], dim=1),
            torch.cat([summed, scaled[:, remain:], size[:, mid:]], dim=1))


def search_rates(model, images: torch.Tensor, labels: torch.Tensor, target: float, steps: int = SEARCH_STEPS,
                 batch_size: int = SEARCH_BATCH, seed: int = 0) -> Rates:
    """DiffRate's search on held-out `images`: per-block counts whose official-formula FLOPs approach
    `target` x dense, by AdamW on the count distributions only (`SEARCH_LR`, cosine), the backbone frozen.
    Deterministic for a seed (the batches are drawn by a seeded generator)."""
    frozen = [prm.requires_grad for prm in model.parameters()]
    try:
        with torch.inference_mode(False), torch.enable_grad():  # also when called under inference mode
            search = RateSearch(model)
            optimizer = torch.optim.AdamW([search.logits], lr=SEARCH_LR[0], weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=SEARCH_LR[1])
            generator = torch.Generator().manual_seed(seed)
            dense = model_flops(model, None)
            order = torch.empty(0, dtype=torch.long)
            model.requires_grad_(False)
            for _ in range(steps):
                if len(order) < batch_size:
                    order = torch.cat([order, torch.randperm(len(images), generator=generator)])
                batch, order = order[:batch_size], order[batch_size:]
                logits, flops = search(images[batch].clone())
                fraction = flops / dense
                budget = FLOPS_WEIGHT * (DEIT_S_GFLOPS * (fraction - target)) ** 2
                loss = F.cross_entropy(logits, labels[batch].clone()) + budget
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for prm, flag in zip(model.parameters(), frozen):
            prm.requires_grad_(flag)
    return search.rates()


def formula_fraction(model, rates: Rates) -> float:
    """The official formula's FLOPs at `rates` as a fraction of the dense model's."""
    return model_flops(model, rates) / model_flops(model, None)


def model_flops(model, rates: Rates | None) -> float:
    """The official formula's FLOPs of `model` at `rates` (None: dense)."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    counts = [(n, n)] * len(model.blocks) if rates is None else zip(rates.prune, rates.merge)
    return float(formula_flops(model, [torch.tensor([float(p), float(m)], dtype=torch.float64) for p, m in counts]))


@register_method
class DiffRate(Method):
    name = "diffrate"
    family = "merge"
    needs_calibration = True
    knobs = (Knob("target", (0.9, 0.7, 0.5, 0.4), noop=1.0, low=0.0, high=1.0,
                  help="DiffRate: FLOPs target of the rate search on the held-out split, a fraction of dense"),
             Knob("gflops", (0.0,), noop=0.0, low=0.0, low_inclusive=True,
                  help="DiffRate: run the official searched rates at these GFLOPs instead of searching (DeiT-S "
                       "2.3-3.1, DeiT-B 8.7-12.5; with --target 1); 0 searches for the target"))
    summary = ("per-block prune and merge counts searched by gradient for a FLOPs target; prune by class attention, "
               "merge by similarity")

    def calibrate(self, model, calibration, target=1.0, gflops=0.0):
        """The per-block counts: published ones at `gflops`, else searched for `target` on the held-out split."""
        n = model.patch_embed.num_patches + model.num_prefix_tokens
        if gflops and target < 1.0:
            raise BenchError(f"diffrate: target={target:g} searches, gflops={gflops:g} takes the published rates; "
                             "give one (with gflops, target=1)")
        if gflops:
            rates = published(model, gflops)
        elif target >= 1.0:
            rates = Rates((n,) * len(model.blocks), (n,) * len(model.blocks))
        elif calibration is None:
            raise BenchError("diffrate searches its rates on a held-out split: `tokenbench bench` and `calibrate` do "
                             "(in Python, pass calibration=(images, labels)); or give gflops for the published rates "
                             "of DeiT-S/DeiT-B")
        else:
            rates = search_rates(model, *calibration, target)
        return {"prune": list(rates.prune), "merge": list(rates.merge),
                "formula_fraction": formula_fraction(model, rates)}

    def build(self, model, target=1.0, gflops=0.0, calibration=None, calibrated=None):
        calibrated = calibrated or self.calibrate(model, calibration, target, gflops)
        return with_rates(model, Rates(tuple(calibrated["prune"]), tuple(calibrated["merge"])))


SHAPES = {"deit_small_patch16_224": (384, 12, 197), "deit_base_patch16_224": (768, 12, 197)}  # width, depth, tokens


def published(model, gflops: float) -> Rates:
    """The official searched rates at `gflops` of this timm model's architecture, or of the published one with its
    shapes (width, depth, tokens: `vit_base_patch16_224` takes DeiT-B's)."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture")
    shape = (model.embed_dim, len(model.blocks), model.patch_embed.num_patches + model.num_prefix_tokens)
    names = [name] if name in SHAPES else [n for n, s in SHAPES.items() if s == shape]
    options = {g: rates for (n, g), rates in PUBLISHED.items() if n in names}
    if gflops not in options:
        given = ", ".join(f"{g:g}" for g in options) or "none"
        raise BenchError(f"diffrate: no published rates for {name} at {gflops:g} GFLOPs (published for its shapes: "
                         f"{given}; DeiT-S 2.3-3.1 and DeiT-B 8.7-12.5 exist)")
    return options[gflops]
