"""``lull bench-plan``: how long one planning step takes at cluster scale.

A synthetic cluster (sessions with contexts drawn from 20k to 200k tokens, GPU tier
sized for about 40% of them, DRAM for 40%, the shared tier for the rest but a
margin) is brought to a steady state by running the policy the way the controller
does: event, plan, apply. Then it times ``TierPlanner.plan`` alone

- in steady state: one event (a request arriving, or a call finishing) per step;
- after a burst: many requests arriving at once, one plan for all of them.

This is a benchmark, not a test: it prints figures and writes JSON.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich_argparse import RichHelpFormatter

from controller.policy import ClusterState, Phase, ReplicaSpec, TierPlanner
from controller.cli.args import positive_int

MAX_OUTPUT = 1024
console = Console(stderr=True)


class _Workload:
    """Drives a ClusterState with requests and call completions, seeded."""

    def __init__(self, sessions: int, replicas: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.context = {f"s{i:05d}": self.rng.randint(20_000, 200_000) for i in range(sessions)}
        mean = statistics.fmean(self.context.values())
        per_replica = mean * sessions / replicas
        specs = [
            ReplicaSpec(f"r{i:03d}", int(0.4 * per_replica), int(0.4 * per_replica))
            for i in range(replicas)
        ]
        self.state = ClusterState(specs, shared_tokens=int(0.3 * mean * sessions))
        self.planner = TierPlanner()
        self.now = 0.0
        self.running: list[tuple[float, str]] = []  # (finish time, session)

    def plan_and_apply(self) -> float:
        started = time.perf_counter()
        plan = self.planner.plan(self.state, self.now)
        elapsed = time.perf_counter() - started
        self.state.apply(plan, self.now)
        for admit in plan.admits:
            heapq.heappush(self.running, (self.now + self.rng.uniform(1, 20), admit.session_id))
        return elapsed

    def arrive(self, session_id: str) -> None:
        prompt = self.context[session_id] - MAX_OUTPUT
        self.state.request_arrived(session_id, self.now, prompt, MAX_OUTPUT)

    def finish_next(self) -> None:
        finish, session_id = heapq.heappop(self.running)
        self.now = max(self.now, finish)
        output = self.rng.randint(1, MAX_OUTPUT)
        self.state.call_finished(session_id, self.now, self.context[session_id] - MAX_OUTPUT + output)

    def idle_sessions(self, count: int) -> list[str]:
        """Up to ``count`` distinct sessions between calls, by rejection sampling
        (a scan of every session per event would dominate the run)."""
        names = list(self.context)
        chosen: dict[str, None] = {}
        for _ in range(count * 20):
            if len(chosen) == count:
                break
            session_id = self.rng.choice(names)
            if self.state.sessions[session_id].phase is Phase.TOOL:
                chosen[session_id] = None
        return list(chosen)

    def one_event(self) -> None:
        self.now += self.rng.expovariate(50.0)
        if self.running and (self.running[0][0] <= self.now or self.rng.random() < 0.5):
            self.finish_next()
        else:
            idle = self.idle_sessions(1)
            if idle:
                self.arrive(idle[0])


def run_bench(sessions: int, replicas: int, seed: int, steps: int, bursts: int, burst_size: int) -> dict:
    load = _Workload(sessions, replicas, seed)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("warming up", total=sessions)
        names = list(load.context)
        for start in range(0, sessions, replicas):  # one arrival per replica per plan
            for session_id in names[start : start + replicas]:
                load.state.open_session(session_id, load.now)
                load.arrive(session_id)
            load.plan_and_apply()
            progress.advance(task, len(names[start : start + replicas]))
            load.now += 0.1
        while load.running:  # first calls end; gated sessions get in as room appears
            for _ in range(min(replicas, len(load.running))):
                load.finish_next()
            load.plan_and_apply()
        steady_task = progress.add_task("steady-state steps", total=steps)
        steady = []
        for _ in range(steps):
            load.one_event()
            steady.append(load.plan_and_apply())
            progress.advance(steady_task)
        burst_task = progress.add_task("bursts", total=bursts)
        burst = []
        for _ in range(bursts):
            load.now += 1.0
            for session_id in load.idle_sessions(burst_size):
                load.arrive(session_id)
            burst.append(load.plan_and_apply())
            # Let the burst's calls run out before the next one, planning per ten
            # events (untimed) so the run stays short.
            for event in range(burst_size):
                load.one_event()
                if event % 10 == 9:
                    load.plan_and_apply()
            progress.advance(burst_task)
    load.state.check_integrity()
    return {
        "sessions": sessions,
        "replicas": replicas,
        "seed": seed,
        "steady_steps": steps,
        "plan_step_ms_p50": _percentile(steady, 50),
        "plan_step_ms_p99": _percentile(steady, 99),
        "bursts": bursts,
        "burst_size": burst_size,
        "burst_plan_step_ms_p50": _percentile(burst, 50),
        "burst_plan_step_ms_p99": _percentile(burst, 99),
        "gated_at_end": sum(1 for r in load.state.sessions.values() if r.phase is Phase.GATED),
    }


def _percentile(seconds: list[float], q: int) -> float:
    ordered = sorted(seconds)
    index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
    return round(ordered[index] * 1000, 3)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench-plan",
        help="time the tier planner's steps at cluster scale",
        description=__doc__,
        formatter_class=RichHelpFormatter,
    )
    parser.add_argument("--sessions", type=positive_int, default=10_000)
    parser.add_argument("--replicas", type=positive_int, default=100)
    parser.add_argument("--steps", type=positive_int, default=1000, help="steady-state steps timed")
    parser.add_argument("--bursts", type=positive_int, default=10)
    parser.add_argument("--burst-size", type=positive_int, default=500, help="requests per burst")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    result = run_bench(args.sessions, args.replicas, args.seed, args.steps, args.bursts, args.burst_size)
    print(
        f"plan_step_ms_p50={result['plan_step_ms_p50']} plan_step_ms_p99={result['plan_step_ms_p99']} "
        f"burst_plan_step_ms_p50={result['burst_plan_step_ms_p50']} "
        f"burst_plan_step_ms_p99={result['burst_plan_step_ms_p99']} "
        f"(sessions={args.sessions} replicas={args.replicas} burst_size={args.burst_size})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
