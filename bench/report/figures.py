"""Writing a matplotlib figure: one way for every PNG the suite draws."""

from __future__ import annotations

from pathlib import Path


def save_png(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` to `path` (its folder created), tightly laid out, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
