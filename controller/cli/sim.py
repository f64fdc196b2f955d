"""``lull sim``: compare cluster policies on the same seeded, simulated workload.

Every policy replays the same trace sessions in the same order (MORI's closed-loop
protocol, or Poisson session arrivals) on replicas timed by the roofline cost model.
The controller's policies (``lull``, ``mori``, ``lru-offload``) run from the same
definitions and through the same plan driver as the live controller; the other names
are models of baselines the controller does not run. Everything it writes is marked
simulated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich_argparse import RichHelpFormatter

from loadgen.sim.cost_model import CostModel, get_profile
from loadgen.sim.policies import POLICIES
from loadgen.sim.report import markdown_table, write_report
from loadgen.sim.simulator import SimConfig, Simulation, summarize
from loadgen.sim.limit import Limit, throughput_limit
from loadgen.sim.workload import DEFAULT_MAX_TOKENS, build_workload
from loadgen.traces import load_sessions

PROGRESS_AFTER_S = 1800.0  # show a progress bar when a comparison simulates this much or more


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("sim", help="simulate policies on real traces", description=__doc__,
                                   formatter_class=RichHelpFormatter)
    parser.add_argument("--compare", required=True, help=f"comma list of policies: {', '.join(POLICIES.names())}")
    parser.add_argument("--profile", required=True, help="GPU profile, e.g. h200-80g")
    parser.add_argument("--model", required=True, help="model, e.g. qwen2.5-7b")
    parser.add_argument("--programs", required=True, help="closed-loop programs per replica; a comma list sweeps")
    parser.add_argument("--replicas", type=int, default=1, help="engine replicas")
    parser.add_argument("--cpu-ratio", type=float, default=1.0, help="DRAM tier / GPU KV capacity per replica")
    parser.add_argument("--shared-ratio", type=float, default=None,
                        help="shared tier / total GPU KV (default: 4 for policies that use it, else 0)")
    parser.add_argument("--unequal-memory", action="store_true",
                        help="do not give a policy without a shared tier the shared tier's bytes as DRAM")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="max_tokens each request asks for (reserved by the controller), cut to the window")
    parser.add_argument("--oracle-output", action="store_true",
                        help="reserve each call's exact output instead of max_tokens (an oracle)")
    parser.add_argument("--duration", type=float, required=True, help="simulated seconds")
    parser.add_argument("--trace-dir", type=Path, default=None, help="trace folder (default: the shared split)")
    parser.add_argument("--trace-limit", type=int, default=None, help="read only the first N trace files")
    parser.add_argument("--seed", type=int, default=0, help="seeds session order and start times")
    parser.add_argument("--token-scale", type=float, default=1.0, help="multiply every call's tokens")
    parser.add_argument("--gap-model", choices=("trace", "mori"), default="trace",
                        help="trace: the recorded tool-call gaps; mori: resampled (seeded) to MORI's published "
                             "P50 1.1 s, P90 2.0 s, P99 20 s")
    parser.add_argument("--arrival", choices=("closed", "poisson"), default="closed",
                        help="closed: MORI's closed loop; poisson: open-loop session arrivals")
    parser.add_argument("--rate", type=float, default=0.0, help="poisson: sessions per second, cluster-wide")
    parser.add_argument("--json", type=Path, required=True, help="write one record per run here")
    parser.add_argument("--report", type=Path, default=None, help="write report.md and PNG plots here")
    parser.set_defaults(func=run)
    return parser


def _programs(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--programs must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--programs needs integers >= 1, got {text!r}")
    return values


def limit_fields(limit: Limit | None, output_tokens_per_s: float) -> dict:
    """The computed limit's figures for a record (``loadgen.sim.limit``); n/a for open arrivals."""
    if limit is None:
        return {"limit_output_tokens_per_s": None, "limit_binding": None, "limit_fraction": "n/a"}
    return {"limit_output_tokens_per_s": round(limit.output_tokens_per_s, 1), "limit_binding": limit.binding,
            "limit_fraction": round(output_tokens_per_s / limit.output_tokens_per_s, 3)
            if limit.output_tokens_per_s > 0 else "n/a"}


def run(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.compare.split(",") if p.strip()]
    for name in policies:
        POLICIES.get(name)
    sweep = _programs(args.programs)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    profile = get_profile(args.profile, args.model, cpu_ratio=args.cpu_ratio)
    cost = CostModel(profile)
    gpu, dram = profile.kv_capacity_tokens, profile.dram_kv_tokens
    workload = build_workload(load_sessions(args.trace_dir, limit=args.trace_limit),
                              context_window=profile.context_window, seed=args.seed, token_scale=args.token_scale,
                              max_tokens=None if args.oracle_output else args.max_tokens,
                              gap_model=args.gap_model)
    shared = None if args.shared_ratio is None else int(args.shared_ratio * gpu * args.replicas)
    console = Console(stderr=True)
    console.print(f"workload (simulated): {workload.notes}", markup=False, highlight=False)
    runs = [(n, p) for n in sweep for p in policies]
    limits = {n: throughput_limit(workload, cost, n * args.replicas, args.replicas, args.duration)
              for n in sweep} if args.arrival == "closed" else {}
    records = []
    show = args.duration * len(runs) >= PROGRESS_AFTER_S
    with Progress(console=console, disable=not show, transient=True) as progress:
        for n, name in runs:
            task = progress.add_task(f"{name} x{n}", total=args.duration)
            config = SimConfig(name, n, args.replicas, args.duration, gpu, dram, shared, seed=args.seed,
                               arrival=args.arrival, rate=args.rate, equal_memory=not args.unequal_memory)
            started = time.perf_counter()
            sim = Simulation(config, workload, cost, progress=lambda t, k=task: progress.update(k, completed=t))
            metrics = sim.run()
            record = summarize(config, metrics, sim)
            record["wall_s"] = round(time.perf_counter() - started, 2)
            record["workload"] = workload.notes
            record |= limit_fields(limits.get(n), record["output_tokens_per_s"])
            records.append(record)
            progress.remove_task(task)
            if show:  # a line per run too, for logs where the bar does not render
                progress.console.print(f"simulated {name} x{n} programs/replica: {args.duration:g} s "
                                       f"in {record['wall_s']:g} s wall ({len(records)}/{len(runs)})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1))
    console.print(markdown_table(records), markup=False, highlight=False)
    console.print(f"simulated; wrote {args.json}")
    if args.report is not None:
        for path in write_report(args.report, records, cost.describe(), workload.notes):
            console.print(f"wrote {path}")
    return 0
