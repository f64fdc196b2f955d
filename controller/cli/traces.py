"""``lull traces``: look at the real agent traces the load generator replays.

``lull traces stats`` prints what a trace folder's main agents look like (LLM calls
per session, tool and human gaps, tokens per call, prefix sharing, long gaps) beside
the figures the traces README gives for the whole public set.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich_argparse import RichHelpFormatter

from loadgen.trace_stats import (
    LONG_GAP_POPULATION,
    LONG_GAP_S,
    README_LONG_GAP_FRACTION,
    README_LONG_GAP_KV_SHARE,
    TraceStats,
    compute_stats,
)
from loadgen.traces import TRACE_DIR_ENV, load_sessions, resolve_trace_dir
from controller.cli.args import positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "traces",
        help="inspect the real agent traces",
        description=__doc__,
        formatter_class=RichHelpFormatter,
    )
    commands = parser.add_subparsers(dest="traces_command", metavar="COMMAND", required=True)
    stats = commands.add_parser(
        "stats",
        help="figures of a trace folder beside the README's",
        description=(
            "Percentiles of a trace folder's main agents beside the README's figures for "
            f"the whole public set. The folder: --dir, else ${TRACE_DIR_ENV}, else the shared split."
        ),
        formatter_class=RichHelpFormatter,
    )
    stats.add_argument("--dir", type=Path, default=None, help=f"trace folder (default: ${TRACE_DIR_ENV} or the shared split)")
    stats.add_argument("--limit", type=positive_int, default=None, help="read only the first N files by name")
    stats.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    stats.set_defaults(func=run_stats)
    return parser


def run_stats(args: argparse.Namespace) -> int:
    folder = resolve_trace_dir(args.dir)
    started = time.perf_counter()
    sessions = load_sessions(folder, limit=args.limit)
    stats = compute_stats(sessions)
    elapsed = time.perf_counter() - started
    Console().print(render(stats, f"{folder} ({elapsed:.1f} s)"))
    if args.json:
        args.json.write_text(json.dumps({"trace_dir": str(folder), **stats.to_json()}, indent=2) + "\n")
    return 0


def render(stats: TraceStats, source: str) -> Table:
    table = Table(
        title=f"{stats.main_sessions} main agents (+{stats.subagent_sessions} sub-agents, not pooled): {source}",
        caption=(
            f"(README: whole public set, 710 main agents.) Gaps over {LONG_GAP_S / 60:.0f} min, "
            f"of {stats.gaps} {LONG_GAP_POPULATION} ({stats.unknown_gaps} unknown): "
            f"{stats.long_gap_fraction:.1%} of gaps (README {README_LONG_GAP_FRACTION:.0%}), "
            f"holding {stats.long_gap_kv_share:.1%} of idle KV token-seconds "
            f"(README {README_LONG_GAP_KV_SHARE:.0%})."
        ),
    )
    table.add_column("figure")
    table.add_column("population")
    table.add_column("n", justify="right")
    for name in ("p50", "p90", "p99"):
        table.add_column(f"{name} (README)", justify="right")
    for figure in stats.figures:
        cells = [
            f"{_number(mine)} [dim]({_number(theirs) or '-'})[/dim]"
            for mine, theirs in zip((figure.p50, figure.p90, figure.p99), figure.readme)
        ]
        table.add_row(figure.label, figure.population, str(figure.count), *cells)
    return table


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "-"
    if abs(value) < 10 and value != int(value):
        return f"{value:.2f}"
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    if abs(value) >= 1_000:
        return f"{value:,.0f}"
    return f"{value:.0f}"
