"""The `tokenbench` command line (also `python -m tokenbench`): a thin layer over the Python API.

Each subcommand is a module of this package with `add_parser(subparsers)`, which builds its options from
light imports only, and `run(args) -> int`, which imports the library it drives; this file wires them
together and turns user errors into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from tokenbench.errors import BenchError

COMMANDS = ["methods", "bench", "leaderboard", "train", "calibrate", "cache", "regression", "profile", "visualize",
            "speed", "suite", "support", "curve", "compare", "class_attention"]
COMMAND_ENTRY_POINTS = "tokenbench.commands"  # plugin commands: a module with add_parser(subparsers) and run(args)


def command_modules() -> list:
    """The built-in command modules, then every plugin's (a broken plugin is named in a BenchError)."""
    modules = [importlib.import_module(f"tokenbench.cli.{name}") for name in COMMANDS]
    for ep in importlib.metadata.entry_points(group=COMMAND_ENTRY_POINTS):
        try:
            modules.append(ep.load())
        except Exception as err:
            raise BenchError(f"command plugin {ep.name!r} ({ep.value}) failed to import: {err}") from None
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbench", description="Benchmark token-reduction methods for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules():
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
