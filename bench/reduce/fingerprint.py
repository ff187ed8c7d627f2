"""Fingerprints of what a computation depends on: tensors' bytes and a module's parameters, for the caches that
reuse an answer only while its inputs are unchanged (the calibration store, the sweep's dense prefixes, DVT's
exit outputs)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn


def tensor_digest(tensors) -> str:
    """sha256 of tensors' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parameter_versions(module: nn.Module) -> tuple | None:
    """Each parameter's identity and in-place version: it changes when a weight is replaced or edited in place.
    None where a parameter keeps no version (made in inference mode), so nothing can be keyed on it."""
    try:
        return tuple((id(p), p._version) for p in module.parameters())
    except RuntimeError:
        return None
