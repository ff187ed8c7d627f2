"""The `tokenbench` command line (also `python -m tokenbench`): a thin layer over the Python API.

Each subcommand lives in `tokenbench.commands` with `add_parser(subparsers)` and `run(args) -> int`; this
file wires them together and turns user errors into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tokenbench.errors import BenchError

COMMANDS = ["methods", "bench", "leaderboard", "train", "calibrate", "dvt_ablation", "regression", "profile", "visualize", "speed",
            "suite"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbench", description="Benchmark token-reduction methods for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"tokenbench.commands.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except BenchError as err:  # a broken plugin, named
        print(f"tokenbench: error: {err}", file=sys.stderr)
        return 2
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
