"""Is a difference in accuracy more than noise? Paired tests on the same images, from per-image outcomes.

- `delta_ci`: the paired bootstrap 95% interval of Δ top-1 (method − reference). Resampling images with
  replacement and averaging the per-image differences (each −1, 0 or +1) is the same as drawing the counts
  of the three kinds from a multinomial, so B resamples cost B draws, not B × n.
- `mcnemar`: the exact McNemar test, a two-sided binomial test on the images where exactly one of the two
  is right (scipy's `binomtest`).
- `holm`: Holm's step-down adjustment of several p-values (family-wise error), for the leaderboard's marks.

Rows keep their per-image outcomes as `correct_bits` (one bit per image, base64) with `image_key`, so all
of this is recomputed from a results folder alone, shards merged.
"""

from __future__ import annotations

import base64
import hashlib

import numpy as np

RESAMPLES = 10_000
SEED = 0  # the interval is a function of the outcomes alone: the same rows give the same interval


def delta_ci(method: np.ndarray, reference: np.ndarray, level: float = 0.95, resamples: int = RESAMPLES,
             seed: int = SEED) -> tuple[float, float]:
    """Paired bootstrap interval, in points of top-1 %, of mean(method) − mean(reference) (bool per image)."""
    diff = method.astype(np.int8) - reference.astype(np.int8)
    n = len(diff)
    counts = [(diff == -1).sum(), (diff == 0).sum(), (diff == 1).sum()]
    draws = np.random.default_rng(seed).multinomial(n, np.asarray(counts) / n, size=resamples)
    deltas = 100 * (draws[:, 2] - draws[:, 0]) / n
    low, high = np.percentile(deltas, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value of two classifiers' outcomes (bool per image) on the same images."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    m = len(pvalues)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def decimals_for(n_images: int) -> int:
    """Decimals of a top-1 percentage that the image count supports: one image is 100/n points."""
    return max(0, int(np.ceil(np.log10(max(n_images, 1) / 100))))


def outcome_fields(correct: np.ndarray | None, labels: np.ndarray | None) -> dict:
    """The per-image outcomes a results row keeps, compactly: top-1 right or wrong as base64 bits, and a key
    of the evaluated labels (in order), so that two rows are paired only when they saw the same images."""
    if correct is None:
        return {}
    bits = base64.b64encode(np.packbits(correct.astype(bool)).tobytes()).decode()
    key = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]
    return {"correct_bits": bits, "image_key": key}


def correct_from_bits(bits: str, n: int) -> np.ndarray:
    """The per-image top-1 outcomes of a row (bool [n]) from its `correct_bits`."""
    return np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8), count=n).astype(bool)
