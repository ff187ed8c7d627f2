"""DVT's two ablations as tables: what each reuse path adds per exit, and what the exit criterion is worth.

`reuse_table` is the paper's Table 4 shape: every exit of each cascade (none / feature / relation / both)
evaluated on every image, with the cumulative GMACs of answering there and what reuse adds to them over the
cascade without reuse. `criterion_table` is its Table 7 shape: at each GMACs budget, the thresholds of each
exit criterion are solved on the held-out split exactly as `dvt` does it, then the test split is answered
with them. Both work from every exit's outputs computed once per split, so the early-exit decisions are the
cascade's own (`thresholds.exit_choice`) without rerunning it per budget.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .thresholds import CRITERIA, exit_choice, exit_outputs, family_thresholds, search_thresholds

REUSE_ORDER = ("none", "feature", "relation", "feature + relation")


def reuse_label(cascade) -> str:
    names = [n for n, on in (("feature", cascade.feature_reuse), ("relation", cascade.relation_reuse)) if on]
    return " + ".join(names) or "none"


def reuse_table(cascades: dict[str, torch.nn.Module], images: torch.Tensor, labels: torch.Tensor) -> pd.DataFrame:
    """Per cascade (by name) and exit: top-1 on `images` with every image answered there, cumulative GMACs, and
    the GMACs reuse adds over the cascade without reuse (percent), where that cascade is among them."""
    rows = []
    for name, cascade in cascades.items():
        _, correct = exit_outputs(cascade, images, labels)
        gmacs = cascade.exit_gmacs(images[:1])
        for k, (hits, g) in enumerate(zip(correct, gmacs), 1):
            rows.append({"reuse": reuse_label(cascade), "checkpoint": name, "exit": k,
                         "top-1 %": 100 * hits.mean(), "GMACs": float(g)})
    table = pd.DataFrame(rows)
    base = table[table["reuse"] == "none"].drop_duplicates("exit").set_index("exit")["GMACs"]
    table["reuse GMACs +%"] = [100 * (g / base[k] - 1) if k in base else float("nan")
                               for k, g in zip(table["exit"], table["GMACs"])]
    order = {r: i for i, r in enumerate(REUSE_ORDER)}
    return table.sort_values(["exit", "reuse"], key=lambda c: c.map(order) if c.name == "reuse" else c,
                             kind="stable").reset_index(drop=True)


def criterion_table(cascade, val: tuple, test: tuple, budgets, criteria=CRITERIA) -> pd.DataFrame:
    """Per criterion and budget (a fraction of running every exit): thresholds solved on `val`, then test top-1
    and mean GMACs per image on `test`."""
    costs = cascade.exit_gmacs(val[0][:1])
    rows = []
    for criterion in criteria:
        val_scores, val_correct = exit_outputs(cascade, *val, criterion)
        test_scores, test_correct = exit_outputs(cascade, *test, criterion)
        for budget in budgets:
            limit = budget * costs[-1]
            thresholds = (family_thresholds(val_scores, costs, limit) if criterion == "random"
                          else search_thresholds(val_scores, val_correct, costs, limit))
            exits = exit_choice(test_scores, thresholds)
            rows.append({"criterion": criterion, "budget": budget,
                         "top-1 %": 100 * test_correct[exits, np.arange(len(exits))].mean(),
                         "GMACs": float(costs[exits].mean()),
                         "exit fractions": " / ".join(f"{(exits == k).mean():.2f}" for k in range(len(costs)))})
    return pd.DataFrame(rows)
