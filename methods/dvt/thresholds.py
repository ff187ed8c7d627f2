"""DVT's exit criteria and thresholds: the ones that maximise accuracy on held-out images under a GMACs budget.

An exit scores each image in [0, 1] and the image leaves when its score reaches the exit's threshold:
`confidence` is the paper's max softmax, `entropy` is one minus the prediction's entropy over log(classes),
and `random` is a draw per image that ignores the prediction (the paper's random-exit baseline). The draw
is a keyed hash of the image's bytes, so it is seeded, the same at every exit, and an image's exit does not
depend on the other images in its batch.
"""

from __future__ import annotations

import hashlib
import math
import weakref

import numpy as np
import torch

RANDOM_KEY = b"tokenbench-dvt-random-exit-0"  # the seed of random exit

from tokenbench.reduce import BenchError, parameter_versions, tensor_digest

CRITERIA = ("confidence", "entropy", "random")  # what decides an early exit (`exit_scores`)


def exit_choice(confidence: np.ndarray, thresholds) -> np.ndarray:
    """[n] index of the exit each image leaves at, from [K, n] max-softmax confidences."""
    K = confidence.shape[0]
    leaves = np.vstack([confidence[:-1] >= np.asarray(thresholds)[:, None], np.ones((1, confidence.shape[1]), bool)])
    return leaves.argmax(0) if K > 1 else np.zeros(confidence.shape[1], int)


def proportion_thresholds(confidence: np.ndarray, q: float) -> np.ndarray:
    """The paper's family: exit proportions pi_k ~ q^k; each threshold lets floor(n pi_k) running images leave."""
    K, n = confidence.shape
    share = q ** np.arange(1, K + 1, dtype=float)
    share /= share.sum()
    running = np.ones(n, bool)
    thresholds = []
    for k in range(K - 1):
        count = int(np.floor(n * share[k]))
        conf = np.sort(confidence[k, running])[::-1]
        t = conf[count - 1] if count > 0 else np.inf
        thresholds.append(t)
        running &= confidence[k] < t
    return np.array(thresholds)


def exit_score(logits: torch.Tensor, images: torch.Tensor, criterion: str) -> torch.Tensor:
    """[B] score in [0, 1] of each image at an exit; higher means leave sooner."""
    if criterion == "confidence":
        return logits.float().softmax(-1).amax(-1)
    if criterion == "entropy":
        logp = logits.float().log_softmax(-1)
        return 1 - (-(logp.exp() * logp).sum(-1)) / math.log(logits.shape[-1])
    if criterion == "random":
        draws = [int.from_bytes(hashlib.blake2b(im.cpu().contiguous().numpy().tobytes(), digest_size=8,
                                                key=RANDOM_KEY).digest(), "little") for im in images]
        return 1 - torch.tensor(draws, dtype=torch.float64, device=logits.device) / 2.0**64  # 1 - u, u in [0, 1)
    raise BenchError(f"unknown exit criterion {criterion!r}; use one of {', '.join(CRITERIA)}")


def family_thresholds(scores: np.ndarray, exit_costs: np.ndarray, budget: float) -> np.ndarray:
    """The paper's exit proportions pi_k ~ q^k with the largest q whose mean cost on these images is within
    `budget` (bisection on log q): how random exit picks its exit fractions, without looking at accuracy."""
    def cost(log_q):
        return exit_costs[exit_choice(scores, proportion_thresholds(scores, math.exp(log_q)))].mean()

    if cost(-20.0) > budget + 1e-12:
        raise BenchError(f"budget {budget:.4g} GMACs is below the first exit's cost ({exit_costs[0]:.4g} GMACs)")
    low, high = -20.0, 20.0
    if cost(high) <= budget + 1e-12:
        return proportion_thresholds(scores, math.exp(high))
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) <= budget + 1e-12 else (low, mid)
    return proportion_thresholds(scores, math.exp(low))


def search_thresholds(confidence: np.ndarray, correct: np.ndarray, exit_costs: np.ndarray, budget: float,
                      seed: int = 0) -> np.ndarray:
    """Thresholds maximising accuracy with mean cost <= `budget` on the held-out images.

    Starts from the best feasible point of the paper's one-parameter family (pi_k ~ q^k), then
    refines all thresholds at once with scipy's differential evolution (the paper used a genetic
    search); among equal accuracies, lower cost wins.
    """
    from scipy.optimize import differential_evolution

    K, n = confidence.shape
    if budget < exit_costs[0] - 1e-12:
        raise BenchError(f"budget {budget:.4g} GMACs is below the first exit's cost ({exit_costs[0]:.4g} GMACs)")
    cols = np.arange(n)

    def score(t):
        k = exit_choice(confidence, t)
        return correct[k, cols].mean(), exit_costs[k].mean()

    def objective(t):
        acc, cost = score(t)
        return -acc + 1e-3 * cost / exit_costs[-1] + 10.0 * max(0.0, cost - budget) / exit_costs[-1]

    candidates = [np.zeros(K - 1)]  # everyone leaves at exit 1: feasible, since budget >= its cost
    candidates += [np.clip(proportion_thresholds(confidence, q), 0, 1) for q in np.geomspace(0.05, 20, 40)]
    feasible = [t for t in candidates if score(t)[1] <= budget + 1e-12]
    start = min(feasible, key=objective)
    result = differential_evolution(objective, [(0.0, 1.0)] * (K - 1), x0=start, seed=seed, maxiter=60,
                                    popsize=20, tol=0, polish=False)
    best = result.x if score(result.x)[1] <= budget + 1e-12 and result.fun <= objective(start) else start
    return np.asarray(best, dtype=float)


_EXITS: dict[tuple, tuple] = {}  # exit_outputs' answers, by what determines them (a few held-out splits)


def exit_outputs(cascade, images: torch.Tensor, labels: torch.Tensor, criterion: str = "confidence",
                 batch_size: int = 256):
    """[K, n] exit scores by `criterion` and correctness of every exit on held-out images.

    Remembered per cascade (its parameters' identity and version), images, labels and criterion: every cost
    of a sweep, and every value a matched-budget search tries, calibrates on the same outputs, which took a
    full cascade pass over the held-out split each time.
    """
    params = parameter_versions(cascade)
    if params is None:
        return _exit_outputs(cascade, images, labels, criterion, batch_size)
    key = (id(cascade), params, tensor_digest([images, labels]), criterion, batch_size)
    held = _EXITS.get(key)
    if held is not None and held[0]() is cascade:
        return tuple(a.copy() for a in held[1])
    if len(_EXITS) >= 8:
        _EXITS.pop(next(iter(_EXITS)))
    answer = _exit_outputs(cascade, images, labels, criterion, batch_size)
    _EXITS[key] = (weakref.ref(cascade), tuple(a.copy() for a in answer))
    return answer


@torch.inference_mode()
def _exit_outputs(cascade, images, labels, criterion, batch_size):
    scores, correct = [], []
    cascade.eval()
    for i in range(0, len(labels), batch_size):
        batch = images[i:i + batch_size]
        outs = cascade.forward_exits(batch)
        scores.append(torch.stack([exit_score(o, batch, criterion).double() for o in outs]))
        correct.append(torch.stack([o.argmax(-1) == labels[i:i + batch_size] for o in outs]))
    return torch.cat(scores, 1).cpu().numpy(), torch.cat(correct, 1).cpu().numpy()
