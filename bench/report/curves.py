"""A training run's learning curve: its val top-1 (model and EMA) by epoch, and what its probes found.

The probes (`tokenbench train --probe topk:keep=0.5 --probe random:keep=0.5 ...`) ask, every few epochs,
whether the model's class attention already tells which tokens matter: keeping the top-k tokens by class
attention should beat keeping random ones at the same keep rate once it does.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from tokenbench.errors import BenchError
from tokenbench.report.figures import save_png


def read_history(path: str | Path) -> list[dict]:
    """The per-epoch history in a checkpoint (`meta["history"]`) or in a run's resume state (`OUT.partial`)."""
    import pickle

    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise BenchError(f"{path}: not a checkpoint or resume state ({err})") from None
    saved = saved if isinstance(saved, dict) else {}
    history = saved["history"] if "history" in saved else saved.get("meta", {}).get("history")
    if not history:
        raise BenchError(f"{path}: holds no training history (a checkpoint from `tokenbench train`, or its OUT.partial)")
    return history


def history_frame(history: list[dict]) -> pd.DataFrame:
    """One row per epoch: loss, val top-1 (%), EMA val top-1 (%) and each probe's top-1 (%) where it ran."""
    rows = []
    for entry in history:
        row = {k: entry[k] for k in ("epoch", "loss") if k in entry}
        row.update({k: 100 * entry[k] for k in ("val_top1", "ema_val_top1") if k in entry})
        row.update({cell: 100 * top1 for cell, top1 in entry.get("probes", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows).set_index("epoch")


def probe_pairs(frame: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """{knob: (topk column, random column)} for every knob setting probed with both methods."""
    pairs = {}
    for column in frame.columns:
        found = re.fullmatch(r"topk:(.+)", column)
        if found and f"random:{found.group(1)}" in frame.columns:
            pairs[found.group(1)] = (column, f"random:{found.group(1)}")
    return pairs


def topk_minus_random(frame: pd.DataFrame) -> pd.DataFrame:
    """Per probed epoch, top-k's top-1 minus random's (points) at each knob setting probed with both."""
    pairs = probe_pairs(frame)
    probed = frame.dropna(subset=[c for pair in pairs.values() for c in pair])
    return pd.DataFrame({knob: probed[topk] - probed[rand] for knob, (topk, rand) in pairs.items()})


def draw(frame: pd.DataFrame, title: str, out: str | Path) -> Path:
    """Two panels: val top-1 by epoch (model, EMA), and top-k minus random at each setting probed with both
    (above zero: class attention picks better tokens than chance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    gaps = topk_minus_random(frame)
    fig, axes = plt.subplots(1, 1 if gaps.empty else 2, figsize=(6 if gaps.empty else 11, 4), squeeze=False)
    left = axes[0][0]
    for column, label in (("val_top1", "model"), ("ema_val_top1", "EMA")):
        if column in frame:
            left.plot(frame.index, frame[column], marker=".", label=label)
    left.set(xlabel="epoch", ylabel="val top-1 (%)", title="learning curve")
    left.legend()
    if not gaps.empty:
        right = axes[0][1]
        right.axhline(0, color="grey", linewidth=1)
        for knob, colour in zip(gaps.columns, sns.color_palette(n_colors=len(gaps.columns))):
            right.plot(gaps.index, gaps[knob], color=colour, marker="o", label=knob)
        right.set(xlabel="epoch", ylabel="top-k minus random (points)",
                  title="probes: class-attention top-k against random tokens")
        right.legend(fontsize="small")
    for ax in axes[0]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return save_png(fig, out)
