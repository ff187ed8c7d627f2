"""The leaderboard as markdown: `leaderboard.md`, each section's table (GitHub style) and its plots."""

from __future__ import annotations

from pathlib import Path

from tokenbench.report.board import Board


def write_markdown(board: Board, out_dir: Path) -> Path:
    lines = [f"# {board.title}", "", f"Regenerate with `{board.command}`. " + board.intro, ""]
    for section in board.sections:
        lines += [f"## {section.heading}", "", section.settings, ""]
        lines.append(section.table.to_markdown(index=False, floatfmt=".4g", tablefmt="github"))
        for path, _ in section.plots:
            lines += ["", f"![{path.stem}](plots/{path.name})"]
        lines.append("")
    path = out_dir / "leaderboard.md"
    path.write_text("\n".join(lines))
    return path
