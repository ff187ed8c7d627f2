"""`tokenbench leaderboard`: regenerate the markdown leaderboard and Pareto plots from results rows."""

from __future__ import annotations

from bench.leaderboard import write_leaderboard
from bench.registry import BenchError


def add_parser(sub):
    p = sub.add_parser("leaderboard", help="regenerate leaderboard.md and plots from a results folder")
    p.add_argument("--results", required=True, help="folder holding results*.jsonl (searched recursively)")
    p.add_argument("--out", default=None, help="where to write leaderboard.md and plots/ (default: --results)")
    return p


def run(args):
    try:
        path = write_leaderboard(args.results, args.out)
    except FileNotFoundError as err:
        raise BenchError(str(err)) from None
    print(f"wrote {path}")
    return 0
