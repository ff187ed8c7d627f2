"""Pictures of a trace: which input patches each token holds after a reduction (`tokenbench visualize`)."""

from __future__ import annotations

import numpy as np

DROPPED = -1


def patch_owners(source) -> np.ndarray:
    """For each input patch ([tokens, patches] source map), the token that holds it, or DROPPED."""
    held = source.numpy() > 0
    return np.where(held.any(axis=0), held.argmax(axis=0), DROPPED)


def render(picture: np.ndarray, owners: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """`picture` [H, W, 3] in [0, 1] with dropped patches washed out, merged groups flat and outlined."""
    gh, gw = grid
    ph, pw = picture.shape[0] // gh, picture.shape[1] // gw
    label = np.kron(owners.reshape(gh, gw), np.ones((ph, pw), dtype=np.int64))
    out = picture.copy()
    out[label == DROPPED] = 0.2 * picture[label == DROPPED] + 0.8 * 0.92
    tokens, counts = np.unique(owners[owners != DROPPED], return_counts=True)
    for token in tokens[counts > 1]:
        region = label == token
        out[region] = picture[region].mean(axis=0)
    merged = np.isin(label, tokens[counts > 1])
    edge = np.zeros_like(merged)
    edge[:, 1:] |= (label[:, 1:] != label[:, :-1]) & (merged[:, 1:] | merged[:, :-1])
    edge[1:, :] |= (label[1:, :] != label[:-1, :]) & (merged[1:, :] | merged[:-1, :])
    out[edge] = 1.0
    return out


def describe(owners: np.ndarray) -> str:
    tokens, counts = np.unique(owners[owners != DROPPED], return_counts=True)
    parts = [f"{int((counts == 1).sum())} kept"]
    if (owners == DROPPED).any():
        parts.append(f"{int((owners == DROPPED).sum())} dropped")
    if (counts > 1).any():
        parts.append(f"{int(counts[counts > 1].sum())} in {int((counts > 1).sum())} merged")
    return ", ".join(parts)
