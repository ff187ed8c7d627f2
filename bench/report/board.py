"""A leaderboard as data: the sections every report writer renders (markdown, the web page, a plugin's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Section:
    """One table of the board: its heading, settings line, table, the unrounded values behind its cells, plots."""

    heading: str
    settings: str
    table: pd.DataFrame
    values: dict[str, pd.Series] = field(default_factory=dict)  # column -> unrounded value per table row
    plots: list[tuple[Path, str]] = field(default_factory=list)  # (PNG file written, SVG document)
    provenance: dict = field(default_factory=dict)


@dataclass
class Board:
    """Everything a writer needs: the title, the introduction, the command that regenerates it, the sections."""

    title: str
    intro: str
    command: str
    sections: list[Section]
