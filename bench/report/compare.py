"""One method against another on the same images: is the difference in top-1 more than sampling noise?

Each row of `method` is paired with the row of `baseline` at the same setting on the same backbone and images:
the same knobs (top-k and random at one keep rate) or the same matched budget. The difference is reported with
its paired bootstrap 95% interval and the exact McNemar p-value (`tokenbench.measure.stats`), from the rows'
per-image outcomes alone, as the leaderboard computes Δ top-1 against the dense model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tokenbench.errors import BenchError
from tokenbench.measure.stats import delta_ci, mcnemar
from tokenbench.report.leaderboard import load_rows, outcomes, paired

SAME_IMAGES = ["model", "dataset", "split", "device_name", "dtype"]  # one backbone, one evaluation


def setting_of(row) -> str:
    """What pairs two rows: the matched budget if the row is at one, else its knobs."""
    return f"budget {row['budget']:g}" if pd.notna(row["budget"]) else row["knob_text"]


def compare(results: str | Path, method: str, baseline: str) -> pd.DataFrame:
    """One line per setting that both methods were measured at on the same images (the last row of each wins):
    their top-1 (%), the difference in points with its 95% interval, McNemar's p and the image count."""
    rows = load_rows(results)
    for name in (method, baseline):
        if not (rows["method"] == name).any():
            raise BenchError(f"no rows of {name!r} under {results} (methods there: "
                             f"{', '.join(sorted(rows['method'].unique()))})")
    rows = rows[rows["method"].isin([method, baseline])].copy()
    rows["setting"] = rows.apply(setting_of, axis=1)
    lines = []
    for key, group in rows.groupby([*SAME_IMAGES, "setting"], sort=False):
        ours, theirs = (group[group["method"] == name] for name in (method, baseline))
        if ours.empty or theirs.empty:
            continue
        a, b = ours.iloc[-1], theirs.iloc[-1]
        if not paired(a, b):
            continue
        right_a, right_b = outcomes(a), outcomes(b)
        low, high = delta_ci(right_a, right_b)
        lines.append({**dict(zip([*SAME_IMAGES, "setting"], key)), f"{method} %": 100 * a["top1"],
                      f"{baseline} %": 100 * b["top1"], "difference": 100 * (a["top1"] - b["top1"]),
                      "95% low": low, "95% high": high, "McNemar p": mcnemar(right_a, right_b),
                      "images": int(a["n_images"])})
    if not lines:
        raise BenchError(f"{method} and {baseline} share no setting on the same images under {results}")
    return pd.DataFrame(lines)
