"""The `tokenbench` command line (also `python -m bench`).

Each subcommand lives in its own module with `add_parser(subparsers)` and `run(args) -> int`;
this file only wires them together and turns user errors into one-line messages with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.registry import BenchError

SUBCOMMANDS = [
    "bench.commands.methods",
    "bench.commands.bench",
    "bench.commands.leaderboard",
    "bench.commands.train",
    "bench.commands.dvt_ablation",
    "bench.commands.regression",
    "bench.commands.profile",
    "bench.commands.visualize",
    "bench.commands.speed",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbench", description="Benchmark token-reduction methods for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(name)
        sp = module.add_parser(sub)
        sp.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except BenchError as err:
        print(f"tokenbench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokenbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
