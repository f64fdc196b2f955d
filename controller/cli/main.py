"""The ``lull`` command line.

Each subcommand lives in its own module that exposes ``add_parser(subparsers)``;
the parser it returns sets ``func`` to a callable taking the parsed namespace and
returning an exit code. Modules are listed here by import path so ``lull --help``
stays fast and one broken optional dependency does not take down every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rich_argparse import RichHelpFormatter

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "controller.cli.traces",
    "controller.cli.bench.plan",
    "controller.cli.sim",
    "controller.cli.bench.live",
    "controller.cli.bench.gateway",
    "controller.cli.bench.elastic",
    "controller.cli.bench.calibrate",
    "controller.cli.bench.kv",
    "controller.cli.platform",
    "controller.cli.bench.chaos",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lull",
        description=(
            "Lull serves LLM agents: it ranks sessions by idleness and keeps the busiest "
            "sessions' KV cache in GPU memory, the next in CPU DRAM, the most idle in a "
            "shared tier."
        ),
        formatter_class=RichHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_path in SUBCOMMAND_MODULES:
        importlib.import_module(module_path).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        # Bad input (a malformed trace, a bad setting) is the user's to fix: say so
        # in one line instead of a traceback.
        print(f"lull {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
