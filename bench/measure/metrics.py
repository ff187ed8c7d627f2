"""Measurements of one configuration: accuracy and per-image GMACs, throughput and latency, memory.

Timing follows the engineering notes: eval mode and inference mode, real dataset images already on
the device, a warm-up by count and by time, several timed repeats of K iterations each (K chosen so a
repeat lasts long enough to time), CUDA synchronised around each repeat, median and IQR reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn

from tokenbench.measure.stats import outcome_fields
from tokenbench.reduce.ledger import CostLedger

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: str):
    """Mixed precision for bf16/fp16 (as timm's benchmark --amp does); nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def measured(merge: str, **kwargs):
    """A field of `Evaluation` with the rule that merges it across shards of the images (`Evaluation.merged`):
    "sum", "fraction" (of the images: exact counts added), "mean" (weighted by images; lists elementwise,
    dicts per key) or "per image" (arrays concatenated in image order; None if a part has none)."""
    return field(metadata={"merge": merge}, **kwargs)


@dataclass
class Evaluation:
    """What evaluating one configuration measured. A new metric is one field here, with its merge rule."""

    n_images: int = measured("sum")
    top1: float = measured("fraction")
    top5: float = measured("fraction")
    gmacs: np.ndarray = measured("per image")
    matmul_gmacs: np.ndarray = measured("per image")  # without norms (what FlopCounterMode counts)
    tokens_per_block: list[float] = measured("mean")  # the tokens entering each block
    stats: dict = measured("mean", default_factory=dict)  # what the method noted per image (e.g. exit fractions)
    nonfinite: int = measured("sum", default=0)  # images whose logits held NaN or inf
    correct: np.ndarray | None = measured("per image", default=None)  # top-1 right or not, in the dataset's order
    labels: np.ndarray | None = measured("per image", default=None)  # in the same order

    @classmethod
    def merged(cls, parts: list["Evaluation"]) -> "Evaluation":
        """One Evaluation from those of consecutive slices of the images (in image order), field by field."""
        parts = [p for p in parts if p.n_images]
        n = sum(p.n_images for p in parts)
        values = {}
        for f in fields(cls):
            own = [getattr(p, f.name) for p in parts]
            rule = f.metadata["merge"]
            if rule == "sum":
                values[f.name] = sum(own)
            elif rule == "fraction":
                values[f.name] = sum(round(v * p.n_images) for v, p in zip(own, parts)) / n
            elif rule == "per image":
                values[f.name] = None if any(v is None for v in own) else np.concatenate(own)
            elif isinstance(own[0], dict):
                values[f.name] = {k: sum(v[k] * p.n_images for v, p in zip(own, parts)) / n for k in own[0]}
            else:
                values[f.name] = (np.sum([np.asarray(v) * p.n_images for v, p in zip(own, parts)], axis=0) / n).tolist()
        return cls(**values)

    def summary(self) -> dict:
        g = self.gmacs
        return {
            "n_images": self.n_images, "top1": self.top1, "top5": self.top5,
            "gmacs": float(g.mean()), "gmacs_p50": float(np.median(g)), "gmacs_std": float(g.std()),
            "gmacs_min": float(g.min()), "gmacs_max": float(g.max()), "gmacs_counter": "ledger",
            "tokens_per_block": [round(t, 3) for t in self.tokens_per_block], "stats": self.stats,
            "nonfinite_logits": self.nonfinite, **outcome_fields(self.correct, self.labels),
        }


def evaluate(model: nn.Module, batches, device: torch.device, dtype: str = "fp32", views: int = 1) -> Evaluation:
    """Top-1/top-5 and the ledger's per-image GMACs over `batches` of (images, labels).

    With `views` > 1 each item is [views, ...] (video clips x crops): its prediction is the mean of the
    views' softmax (VideoMAE's test protocol) and its GMACs the sum over its views.
    """
    model.eval()
    correct1 = correct5 = nonfinite = 0
    gmacs, matmul, tokens, notes, right, seen = [], [], [], {}, [], []
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        if views > 1:
            images = images.flatten(0, 1)
        with torch.inference_mode(), autocast(device, dtype), CostLedger(len(images)) as ledger:
            logits = model(images)
        if views > 1:
            logits = logits.float().softmax(dim=-1).view(len(labels), views, -1).mean(dim=1)
        nonfinite += (~torch.isfinite(logits.float()).all(dim=1)).sum().item()
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        right.append(hits[:, 0].cpu().numpy())
        seen.append(labels.cpu().numpy())
        correct5 += hits.any(dim=1).sum().item()
        gmacs.append(ledger.gmacs.view(len(labels), views).sum(dim=1).numpy())
        matmul.append(ledger.matmul_gmacs.view(len(labels), views).sum(dim=1).numpy())
        tokens.append(ledger.tokens_per_block().numpy())
        for name, values in ledger.notes.items():
            notes.setdefault(name, []).append(values.numpy())
    n = sum(len(g) for g in gmacs)
    if n == 0:
        raise ValueError("no images to evaluate")
    tokens_mean = np.concatenate(tokens).mean(axis=0).tolist() if tokens else []
    stats = {name: float(np.concatenate(v).mean()) for name, v in sorted(notes.items())}
    return Evaluation(n, correct1 / n, correct5 / n, np.concatenate(gmacs), np.concatenate(matmul), tokens_mean, stats,
                      nonfinite, np.concatenate(right), np.concatenate(seen))


@dataclass
class Timing:
    median: float  # items per second (throughput) or milliseconds (latency)
    iqr: float
    repeats: int
    iterations: int  # forward passes per repeat


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pin_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds (64 MiB, 256 MiB) for the rest of this process (every
    timing does it first: `interleaved_seconds`).

    By default glibc raises its mmap threshold as big blocks are freed, so a forward's time depends on what
    the process allocated before: LTMP's speedup ranged 0.46-0.63x over fresh processes, ToMe's 1.98-2.44x,
    and every speedup fell 5-17 % after the exact part's builds. Pinned, LTMP gave 0.60-0.63x and ToMe
    2.11-2.18x. False where the C library is not glibc (nothing changed).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 64 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def interleaved_seconds(models: list, inputs: torch.Tensor, dtype: str = "fp32", repeats: int = 7,
                        warmup_rounds: int = 3, warmup_s: float = 0.5, min_repeat_s: float = 0.1,
                        stop: "StoppingRule | None" = None):
    """Seconds per forward, [repeats done, models]: the one timing loop of `bench`, `speed` and the regression gate.

    Warm-up rounds run every model once, until `warmup_rounds` are done and `warmup_s` has passed; they
    also size each model's repeat (K forwards lasting about `min_repeat_s`). Every timed repeat then runs
    each model's K forwards, in an order that rotates from repeat to repeat (AB, BA, ... for two) so that
    a drift in machine speed cancels out of their ratios; CUDA is synchronised around each. With a `stop`
    rule, repeats end early once every model's timings are tight enough (at most `repeats` run). The
    allocator is pinned first (`pin_allocator`): a timing must not depend on what the process allocated before.
    """
    pin_allocator()
    device = inputs.device
    n = len(models)
    spent = np.zeros(n)
    with torch.inference_mode(), autocast(device, dtype):
        start, rounds = time.perf_counter(), 0
        while rounds < max(warmup_rounds, 1) or time.perf_counter() - start < warmup_s:
            for i, model in enumerate(models):
                _sync(device)
                t0 = time.perf_counter()
                model(inputs)
                _sync(device)
                spent[i] += time.perf_counter() - t0
            rounds += 1
        iterations = [max(1, int(min_repeat_s / max(s / rounds, 1e-9))) for s in spent]
        times = np.zeros((repeats, n))
        for r in range(repeats):
            for j in range(n):
                i = (r + j) % n
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(iterations[i]):
                    models[i](inputs)
                _sync(device)
                times[r, i] = (time.perf_counter() - t0) / iterations[i]
            if stop is not None and stop.done(times[:r + 1]):
                return times[:r + 1], iterations
    return times, iterations


@dataclass(frozen=True)
class StoppingRule:
    """Stop timing once at least `min_repeats` repeats are done and every model's IQR is at most `rel_iqr` of
    its median: a quiet machine needs few repeats, a noisy one gets up to the maximum (and is flagged)."""

    min_repeats: int = 5
    rel_iqr: float = 0.05

    def done(self, times: np.ndarray) -> bool:
        if len(times) < self.min_repeats:
            return False
        q1, median, q3 = np.percentile(times, [25, 50, 75], axis=0)
        return bool(np.all(q3 - q1 <= self.rel_iqr * median))

    def __str__(self) -> str:
        return f"stop when IQR <= {self.rel_iqr:g} x median after >= {self.min_repeats} repeats"


def _median_iqr(values) -> tuple[float, float]:
    q1, q3 = np.percentile(values, [25, 75])
    return float(statistics.median(values)), float(q3 - q1)


def throughput(model, images: torch.Tensor, dtype="fp32", repeats=7, warmup_s=1.0, min_repeat_s=0.2,
               warmup_rounds=3, stop: StoppingRule | None = None) -> Timing:
    """Images per second at the batch size of `images` (real images already on the device)."""
    times, iters = interleaved_seconds([model], images, dtype, repeats, warmup_rounds, warmup_s, min_repeat_s, stop)
    median, iqr = _median_iqr(images.shape[0] / times[:, 0])
    return Timing(median, iqr, len(times), iters[0])


def latency(model, image: torch.Tensor, dtype="fp32", repeats=7, warmup_s=0.5, min_repeat_s=0.1,
            warmup_rounds=3, stop: StoppingRule | None = None) -> Timing:
    """Milliseconds per forward at batch 1."""
    times, iters = interleaved_seconds([model], image[:1], dtype, repeats, warmup_rounds, warmup_s, min_repeat_s, stop)
    median, iqr = _median_iqr(times[:, 0] * 1e3)
    return Timing(median, iqr, len(times), iters[0])


def speedups(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median, IQR) per model of the dense time over its time within each repeat; column 0 is dense."""
    ratios = times[:, :1] / times
    q1, q3 = np.percentile(ratios, [25, 75], axis=0)
    return np.median(ratios, axis=0), q3 - q1


def attention_kernels(model, images, dtype="fp32") -> str | None:
    """Which attention kernels one forward of `model` runs on `images` ('cpu-fused', 'flash+explicit', ...),
    or None for a model whose attention does not go through tokenbench's blocks."""
    from tokenbench.reduce.attention import attention_kernel_log

    with torch.inference_mode(), autocast(images.device, dtype), attention_kernel_log() as seen:
        model(images)
    return "+".join(sorted(seen)) or None


def peak_memory_mb(model, images, device, dtype="fp32") -> float | None:
    """Peak allocated device memory of one forward, where the device reports it (CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), autocast(device, dtype):
        model(images)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def parameter_count(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
