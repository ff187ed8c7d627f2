"""Measurements of one configuration: accuracy and per-image GMACs, throughput and latency, memory.

Timing follows the engineering notes: eval mode and inference mode, real dataset images already on
the device, a warm-up by count and by time, several timed repeats of K iterations each (K chosen so a
repeat lasts long enough to time), CUDA synchronised around each repeat, median and IQR reported.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from bench.ledger import CostLedger

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: str):
    """Mixed precision for bf16/fp16 (as timm's benchmark --amp does); nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


@dataclass
class Evaluation:
    n_images: int
    top1: float
    top5: float
    gmacs: np.ndarray  # per image
    matmul_gmacs: np.ndarray  # per image, without norms (what FlopCounterMode counts)
    tokens_per_block: list[float]  # mean over images of the tokens entering each block
    stats: dict = field(default_factory=dict)  # means of what the method noted per image (e.g. exit fractions)

    def summary(self) -> dict:
        g = self.gmacs
        return {
            "n_images": self.n_images, "top1": self.top1, "top5": self.top5,
            "gmacs": float(g.mean()), "gmacs_p50": float(np.median(g)), "gmacs_std": float(g.std()),
            "gmacs_min": float(g.min()), "gmacs_max": float(g.max()), "gmacs_counter": "ledger",
            "tokens_per_block": [round(t, 3) for t in self.tokens_per_block], "stats": self.stats,
        }


def evaluate(model: nn.Module, batches, device: torch.device, dtype: str = "fp32", views: int = 1) -> Evaluation:
    """Top-1/top-5 and the ledger's per-image GMACs over `batches` of (images, labels).

    With `views` > 1 each item is [views, ...] (video clips x crops): its prediction is the mean of the
    views' softmax (VideoMAE's test protocol) and its GMACs the sum over its views.
    """
    model.eval()
    correct1 = correct5 = 0
    gmacs, matmul, tokens, notes = [], [], [], {}
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        if views > 1:
            images = images.flatten(0, 1)
        with torch.inference_mode(), autocast(device, dtype), CostLedger(len(images)) as ledger:
            logits = model(images)
        if views > 1:
            logits = logits.float().softmax(dim=-1).view(len(labels), views, -1).mean(dim=1)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        correct1 += hits[:, 0].sum().item()
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
    return Evaluation(n, correct1 / n, correct5 / n, np.concatenate(gmacs), np.concatenate(matmul), tokens_mean, stats)


@dataclass
class Timing:
    median: float  # items per second (throughput) or milliseconds (latency)
    iqr: float
    repeats: int
    iterations: int  # forward passes per repeat


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_forward(model, inputs, device, dtype, repeats, warmup_s, min_repeat_s) -> tuple[list[float], int]:
    with torch.inference_mode(), autocast(device, dtype):
        start, runs = time.perf_counter(), 0
        while runs < 3 or time.perf_counter() - start < warmup_s:
            model(inputs)
            _sync(device)
            runs += 1
        per_run = (time.perf_counter() - start) / runs
        iterations = max(1, int(min_repeat_s / max(per_run, 1e-9)))
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iterations):
                model(inputs)
            _sync(device)
            times.append((time.perf_counter() - t0) / iterations)
    return times, iterations


def _median_iqr(values: list[float]) -> tuple[float, float]:
    q1, q3 = np.percentile(values, [25, 75])
    return statistics.median(values), float(q3 - q1)


def throughput(model, images: torch.Tensor, device, dtype="fp32", repeats=7, warmup_s=1.0, min_repeat_s=0.2) -> Timing:
    """Images per second at the batch size of `images` (real images already on `device`)."""
    times, iters = _seconds_per_forward(model, images, device, dtype, repeats, warmup_s, min_repeat_s)
    median, iqr = _median_iqr([images.shape[0] / t for t in times])
    return Timing(median, iqr, repeats, iters)


def latency(model, image: torch.Tensor, device, dtype="fp32", repeats=7, warmup_s=0.5, min_repeat_s=0.1) -> Timing:
    """Milliseconds per forward at batch 1."""
    times, iters = _seconds_per_forward(model, image[:1], device, dtype, repeats, warmup_s, min_repeat_s)
    median, iqr = _median_iqr([t * 1e3 for t in times])
    return Timing(median, iqr, repeats, iters)


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
