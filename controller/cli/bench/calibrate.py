"""``lull calibrate``: fit the simulator's ``cpu-small`` profile to the live CPU engine,
then replay one scaled workload both live and simulated and compare.

1. Probe the running platform through its REST API (the path ``lull bench`` takes):
   time to first token (one output token) of fresh prompts of several sizes, and of
   the same prompts sent again with one more token (all but one token cached), and
   the time between streamed tokens of a long output. The cached probes give the call
   path's fixed cost (intercept: gateway, admission, Serve routing, vLLM request
   setup, charged to the step that starts a prefill) and show whether it grows with
   the prompt (slope); the fresh probes give the effective FLOP/s against the cost
   model's own FLOP count; the decode step time gives the per-step overhead. Memory
   bandwidth is not identifiable here (the tiny model's weights stream in well under
   the step overhead), so it keeps its documented value.
2. Replay the same workload (gaps and sizes capped exactly as ``lull bench`` caps them)
   live under the ``lull`` policy and simulated on ``cpu-small`` with the fitted values,
   and report throughput and mean TTFT side by side. Nothing is tuned per policy.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich_argparse import RichHelpFormatter

from loadgen.sim.workload import CallSpec, SessionSpec, Workload

PROBE_SIZES = (32, 256, 768, 1536)  # prompt tokens of the prefill probes
PROBE_REPEATS = 5
DECODE_TOKENS = 48


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("calibrate", help="fit cpu-small to the live engine; compare sim and live",
                                   description=__doc__, formatter_class=RichHelpFormatter)
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of live (and simulated) replay")
    parser.add_argument("--programs", type=int, default=2, help="closed-loop programs per replica")
    parser.add_argument("--time-scale", type=float, default=0.05, help="multiply every tool/human gap")
    parser.add_argument("--token-scale", type=float, default=0.02, help="multiply every call's tokens")
    parser.add_argument("--max-context", type=int, default=2000, help="compact sessions to this many tokens")
    parser.add_argument("--max-output", type=int, default=32, help="cap output tokens per call")
    parser.add_argument("--trace-dir", type=Path, default=None, help="trace folder (default: the shared split)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the session order")
    parser.add_argument("--url", default=None, help="REST base URL (default: the `lull up` platform's)")
    parser.add_argument("--api-key", default=None, help="bearer key (default: the first configured key)")
    parser.add_argument("--json", type=Path, required=True, help="write the fit and the comparison here")
    parser.set_defaults(func=run, ray_address=None, grpc_target=None)
    return parser


def bench_workload(workload: Workload, max_context: int, max_output: int, time_scale: float) -> Workload:
    """The workload as ``lull bench`` sends it: gaps scaled, outputs and contexts capped,
    reuse bounded by what the previous (capped) call left. Replaying it with
    ``time_scale=1`` and the same caps changes nothing more, so the simulator and the
    live replay see the same calls."""
    sessions = []
    for spec in workload.sessions:
        calls, previous = [], 0
        for c in spec.calls:
            out = max(1, min(c.output_tokens, max_output))
            inp = max(1, min(c.input_tokens, max_context - out))
            reuse = max(0, min(c.reuse_tokens, previous, inp - 1))
            calls.append(CallSpec(c.gap_s * time_scale, inp, out, reuse, c.tool_call))
            previous = inp + out
        sessions.append(SessionSpec(spec.trace_id, tuple(calls)))
    return Workload(tuple(sessions), workload.skipped_calls,
                    f"{workload.notes}; gaps x{time_scale:g}, outputs <= {max_output}, contexts <= {max_context}")


async def probe(client) -> dict:
    """Prefill and decode timings of the live platform, each call a fresh session and fresh
    token ids (a fixed seed would find the previous calibration's prompts in the prefix cache)."""
    rng = random.Random()
    prefill = []
    for i, size in enumerate(s for s in PROBE_SIZES for _ in range(PROBE_REPEATS)):
        sid = f"calib-p{i}-{int(time.time())}"
        out = await client.call(sid, [rng.randrange(20, 1000) for _ in range(size)], 1)
        prefill.append((size, out.ttft_s))
        await client.close_session(sid)
    cached = []  # the same prompt again plus one token: all but the new token comes from KV
    for i, size in enumerate(PROBE_SIZES):
        sid = f"calib-c{i}-{int(time.time())}"
        prompt = [rng.randrange(20, 1000) for _ in range(size)]
        first = await client.call(sid, prompt, 1)
        for _ in range(PROBE_REPEATS):
            prompt = prompt + first.output_ids
            first = await client.call(sid, prompt, 1)
            cached.append((len(prompt), first.ttft_s))
        await client.close_session(sid)
    steps = []
    for i in range(PROBE_REPEATS):
        sid = f"calib-d{i}-{int(time.time())}"
        started = time.monotonic()
        out = await client.call(sid, [rng.randrange(20, 1000) for _ in range(64)], DECODE_TOKENS)
        total = time.monotonic() - started
        if len(out.output_ids) > 1:
            steps.append((total - out.ttft_s) / (len(out.output_ids) - 1))
        await client.close_session(sid)
    return {"prefill": prefill, "cached": cached, "decode_step_s": steps}


def fit(probes: dict, base):
    """cpu-small's GpuSpec fitted to the probes (see the module doc), and the fit's figures.
    Medians per prompt size, so one call slowed by another process does not tilt the line."""
    from loadgen.sim.cost_model import CostModel, Profile
    from loadgen.sim.hardware import MODELS

    unit = CostModel(Profile(dataclasses.replace(base, peak_flops=1.0, mfu=1.0, step_overhead_s=0.0,
                                                 prefill_overhead_s=0.0), MODELS.get("llama-tiny")))
    sizes = sorted({size for size, _ in probes["prefill"]})
    flops = np.array([unit.step_cost(size, 0, 0).compute_s for size in sizes])  # FLOPs, as peak is 1
    ttft = np.array([statistics.median(t for s, t in probes["prefill"] if s == size) for size in sizes])
    # Cached prompts: TTFT grows with the prompt by the call path's per-token cost alone.
    csizes = sorted({size for size, _ in probes["cached"]})
    cttft = [statistics.median(t for s, t in probes["cached"] if s == size) for size in csizes]
    per_token, intercept = np.polyfit(np.array(csizes, dtype=float), np.array(cttft), 1)
    # Fresh prompts: compute, once the call path's growth with the prompt (measured ~0 so
    # far; a clearly positive slope would call for a per-token term) is taken out.
    slope, _ = np.polyfit(flops, ttft - max(0.0, float(per_token)) * np.array(sizes), 1)
    step = statistics.median(probes["decode_step_s"])
    fitted = dataclasses.replace(base, peak_flops=float(1.0 / slope), mfu=1.0, step_overhead_s=float(step),
                                 prefill_overhead_s=max(0.0, float(intercept) - step))
    return fitted, {"effective_flops": 1.0 / slope, "call_intercept_s": float(intercept),
                    "decode_step_s": step, "prefill_overhead_s": fitted.prefill_overhead_s,
                    "cached_slope_s_per_token": float(per_token), "cached_probe": probes["cached"],
                    "prefill_probe": probes["prefill"], "decode_probe": probes["decode_step_s"]}


def simulate(workload: Workload, gpu, programs: int, duration_s: float, gpu_tokens: int, dram_tokens: int) -> dict:
    from loadgen.sim.cost_model import CostModel, Profile
    from loadgen.sim.hardware import MODELS
    from loadgen.sim.simulator import SimConfig, Simulation, summarize

    cost = CostModel(Profile(gpu, MODELS.get("llama-tiny")))
    # Live programs all start at once: no start spread.
    config = SimConfig("lull", programs, 1, duration_s, gpu_tokens, dram_tokens, seed=0, start_spread_s=1e-6)
    sim = Simulation(config, workload, cost)
    return summarize(config, sim.run(), sim)


async def _live(args, workload: Workload, console: Console) -> tuple[dict, dict, int, int]:
    from controller.cli.bench.live import Platform, api_key, endpoints
    from loadgen.clients import RestClient
    from loadgen.replay import ReplaySettings, replay

    url, _, address = endpoints(args)
    platform = Platform(address)
    client = RestClient(url, api_key(args))
    try:
        await platform.switch("lull")
        console.print("probing prefill and decode times ...")
        probes = await probe(client)
        await platform.switch("lull")
        snap = await platform.snapshot()
        gpu = min(t["capacity_tokens"] for t in snap["tiers"] if t["tier"] == "gpu")
        dram = min(t["capacity_tokens"] for t in snap["tiers"] if t["tier"] == "dram")
        console.print(f"replaying {args.duration:g} s live ...")
        settings = ReplaySettings(programs=args.programs, duration_s=args.duration, time_scale=1.0,
                                  max_context=args.max_context, max_output=args.max_output, seed=args.seed,
                                  session_prefix=f"calib-{int(time.time())}")
        result = await replay(workload, client, settings)
    finally:
        await client.close()
    if result.errors:
        raise RuntimeError(f"{len(result.errors)} live calls failed, e.g. {result.errors[0]}")
    return probes, result.summary(), gpu, dram


def run(args: argparse.Namespace) -> int:
    from loadgen.sim.hardware import GPUS
    from loadgen.sim.workload import build_workload
    from loadgen.traces import load_sessions

    console = Console(stderr=True)
    raw = build_workload(load_sessions(args.trace_dir), context_window=args.max_context, seed=args.seed,
                         token_scale=args.token_scale, max_tokens=None)
    workload = bench_workload(raw, args.max_context, args.max_output, args.time_scale)
    probes, live, gpu_tokens, dram_tokens = asyncio.run(_live(args, workload, console))
    base = GPUS.get("cpu-small")
    fitted, figures = fit(probes, base)
    rows = []
    for name, gpu in (("cpu-small as shipped (calibrated)", base), ("cpu-small fitted on this run", fitted)):
        sim = simulate(workload, gpu, args.programs, live["duration_s"], gpu_tokens, dram_tokens)
        rows.append((name, sim))
    table = ["| | output tok/s | mean TTFT s | p50 TTFT s | requests/s |", "|---|---|---|---|---|",
             f"| live ({args.duration:g} s, lull policy) | {live['output_tokens_per_s']:.1f} | "
             f"{live['ttft_mean_s']:.3f} | {live['ttft_p50_s']:.3f} | {live['requests_per_s']:.2f} |"]
    for name, sim in rows:
        d_tp = sim["output_tokens_per_s"] / live["output_tokens_per_s"] - 1
        d_ttft = sim["ttft_mean_s"] / live["ttft_mean_s"] - 1
        table.append(f"| simulated, {name} | {sim['output_tokens_per_s']:.1f} ({d_tp:+.0%}) | "
                     f"{sim['ttft_mean_s']:.3f} ({d_ttft:+.0%}) | {sim['ttft_p50_s']:.3f} | "
                     f"{sim['requests_per_s']:.2f} |")
    console.print("\n".join(table), markup=False, highlight=False)
    console.print(f"fitted: effective {figures['effective_flops'] / 1e9:.2f} GFLOP/s, decode step "
                  f"{figures['decode_step_s'] * 1e3:.1f} ms, call path {figures['prefill_overhead_s'] * 1e3:.1f} ms "
                  f"per prefill step; cached-prompt slope {figures['cached_slope_s_per_token'] * 1e6:.1f} us/token")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"fit": figures, "fitted_gpu": dataclasses.asdict(fitted), "live": live,
                                     "simulated": {name: {k: sim[k] for k in ("output_tokens_per_s", "ttft_mean_s",
                                                                              "ttft_p50_s", "requests_per_s")}
                                                   for name, sim in rows},
                                     "table": table, "workload": workload.notes}, indent=1))
    console.print(f"wrote {args.json}")
    return 0
