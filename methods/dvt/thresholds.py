"""DVT's exit thresholds: the ones that maximise accuracy on held-out images under a GMACs budget."""

from __future__ import annotations

import numpy as np
import torch

from tokenbench.errors import BenchError


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


@torch.inference_mode()
def exit_outputs(cascade, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256):
    """[K, n] max-softmax confidence and correctness of every exit on held-out images."""
    conf, correct = [], []
    cascade.eval()
    for i in range(0, len(labels), batch_size):
        probs = torch.stack(cascade.forward_exits(images[i:i + batch_size])).float().softmax(-1)
        top, pred = probs.max(-1)
        conf.append(top)
        correct.append(pred == labels[i:i + batch_size])
    return torch.cat(conf, 1).numpy(), torch.cat(correct, 1).numpy()
