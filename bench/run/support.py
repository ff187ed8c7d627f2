"""The support table: does each method run on each timm family, or is it refused, and why?

Every method is applied to the small random-init configuration of every family (`tokenbench.models.families`)
at the middle of its default sweep, and run on two random images: a cell is `yes` when that works, else the
one-line reason it was refused. `tokenbench support` prints the table; docs/support.md is its output, and a
test regenerates it, so the table cannot drift from the code.
"""

from __future__ import annotations

import pandas as pd
import torch

from tokenbench.errors import BenchError
from tokenbench.models.families import REFUSED, SUPPORTED, small_model
from tokenbench.reduce.registry import all_methods


def cell(method, model: torch.nn.Module, images: torch.Tensor) -> str:
    """'yes', or why `method` does not run on `model`."""
    knobs = method.sweep_points()[len(method.sweep_points()) // 2]
    torch.manual_seed(0)
    try:
        model = method.with_fresh_parts(model)
        labels = torch.zeros(len(images), dtype=torch.long)
        extra = {"calibration": (images, labels)} if method.needs_calibration else {}
        with torch.inference_mode():
            out = method.build(model, **knobs, **extra).eval()(images)
    except BenchError as err:
        return f"refused: {str(err).split('. Supported:')[0]}"
    return "yes" if torch.isfinite(out).all() else "runs, non-finite logits"


def support_table() -> pd.DataFrame:
    """Rows: methods; columns: families (supported ones first); cells: `yes` or the refusal's reason."""
    columns = {}
    for family in [*SUPPORTED, *REFUSED]:
        torch.manual_seed(0)
        model = small_model(family)
        size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (64, 64)
        images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        columns[family] = {name: cell(cls(), model, images) for name, cls in all_methods().items()}
    return pd.DataFrame(columns)


def support_markdown(table: pd.DataFrame) -> str:
    """The table with `yes` as ✓ and each distinct reason numbered once below it."""
    reasons: dict[str, int] = {}

    def mark(text: str) -> str:
        if text == "yes":
            return "✓"
        number = reasons.setdefault(text, len(reasons) + 1)
        return f"✗ {number}"

    shown = table.map(mark).T  # a row per family, a (short) column per method
    shown.index.name = "family"
    lines = [shown.reset_index().to_markdown(index=False, tablefmt="github"), ""]
    lines += [f"{n}. {text}" for text, n in reasons.items()]
    return "\n".join(lines) + "\n"
