"""`tokenbench leaderboard`: regenerate the markdown leaderboard and Pareto plots from results rows."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("leaderboard", help="regenerate leaderboard.md, plots/ and index.html from a results folder")
    p.add_argument("--results", required=True, help="folder holding results*.jsonl (searched recursively)")
    p.add_argument("--out", default=None, help="where to write leaderboard.md, plots/ and index.html (default: --results)")
    return p


def run(args):
    from tokenbench.report.leaderboard import write_leaderboard

    print(f"wrote {write_leaderboard(args.results, args.out)}")
    return 0
