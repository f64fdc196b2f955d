"""``lull bench``: replay the traces through a running Lull platform under each policy, at
equal memory and under real memory pressure.

The platform is the one ``lull up`` started (its state file gives the API port and the
Ray address). The bench first shows that every policy will run on the same memory:

- **GPU tier = the engine's KV cache.** Each engine replica's real cache (vLLM's
  ``vllm:cache_config_info``) must hold exactly the GPU tier the controller books on it
  (``lull up --gpu-tier-tokens N`` sizes the cache so); otherwise the bench refuses.
- **Equal off-GPU bytes.** The node's DRAM store is the same for every policy. It keeps
  room for the write-through copies of the GPU tier; the rest, X tokens per replica, is
  every policy's off-GPU budget: ``lull`` books X - S in DRAM and S in the shared tier
  (``--shared-fraction``), ``mori`` (no shared tier) books all X in DRAM,
  ``lru-offload`` writes through into the whole store with LRU, ``vllm-lru`` has none.

Then, per policy in ``--policy``, the controller switches policy (a fresh controller
over the same replicas, with that policy's books and the backstop tick scaled by the
time scale, so ``mori``'s tick is the one it would have on the unscaled trace), and N
closed-loop programs per replica replay the same scaled sessions in the same order for
``--duration`` seconds (``loadgen.replay``: cut at the deadline, censored TTFT), by
default through ``/v1/chat/completions``. Where prompt tokens came from is read from the
engine's and the connector's counters (``live_platform``); the report prints the
pressure checks (context vs the GPU tier, a busy engine, recompute vs hit cost) and the
GPU-tier turnovers. Every figure is measured on this machine, never simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich_argparse import RichHelpFormatter

from controller.cli.bench.live_platform import Platform, check_equal_capacity, engine_cache, moved, tier_use
from controller.cli.bench.live_report import (LABEL, counter_delta, goal_lines, hit_table, markdown_table,
                                              pressure_checks, run_figures, time_table, write_report)
from controller.policy import POLICY_DEFINITIONS
from loadgen.replay import ReplaySettings, replay
from loadgen.sim.workload import build_workload
from loadgen.traces import load_sessions

__all__ = ["Platform", "add_endpoint_args", "api_key", "endpoints"]  # the other benches' imports

POLICIES = POLICY_DEFINITIONS.names()  # the controller's live policies
DEFAULT_POLICIES = "lull,mori,lru-offload,vllm-lru"
APIS = ("chat", "completions", "grpc")
SAMPLE_S = 1.0  # tier occupancy sampling period
PROBES = 2  # recompute-vs-hit probes, the median taken


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="replay the traces through a running platform, per policy",
                                   description=__doc__, formatter_class=RichHelpFormatter)
    parser.add_argument("--policy", default=DEFAULT_POLICIES, help=f"comma list of: {', '.join(POLICIES)}")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of replay per policy")
    parser.add_argument("--programs", type=int, default=12, help="closed-loop programs per replica")
    parser.add_argument("--api", choices=APIS, default="chat",
                        help="chat: /v1/chat/completions with text messages (what agents send); completions: "
                             "/v1/completions with token-id prompts; grpc: SessionService with token ids")
    parser.add_argument("--tokenizer", default=None,
                        help="model folder whose tokenizer and chat template size the chat messages "
                             "(default: the config's model, the tiny local one unless model.path is set)")
    parser.add_argument("--time-scale", type=float, default=0.03, help="multiply every tool/human gap and the tick")
    parser.add_argument("--token-scale", type=float, default=0.05, help="multiply every call's tokens")
    parser.add_argument("--max-context", type=int, default=6000, help="compact sessions to this many tokens")
    parser.add_argument("--max-output", type=int, default=32, help="cap output tokens per call")
    parser.add_argument("--shared-fraction", type=float, default=0.5,
                        help="the part of the off-GPU budget that policies with a shared tier book there")
    add_endpoint_args(parser)
    parser.add_argument("--grpc-target", default=None, help="gRPC host:port (default: the config's gateway.grpc_port)")
    parser.add_argument("--trace-dir", type=Path, default=None, help="trace folder (default: the shared split)")
    parser.add_argument("--trace-limit", type=int, default=None, help="read only the first N trace files")
    parser.add_argument("--seed", type=int, default=0, help="seeds the session order")
    parser.add_argument("--json", type=Path, required=True, help="write one record per policy here")
    parser.add_argument("--report", type=Path, default=None, help="write report.md and PNG plots here")
    parser.set_defaults(func=run)
    return parser


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """Where the platform is: flags, else `lull up`'s state file (see ``endpoints``)."""
    parser.add_argument("--url", default=None, help="REST base URL (default: the `lull up` platform's)")
    parser.add_argument("--api-key", default=os.environ.get("LULL_BENCH_API_KEY"),
                        help="bearer key (default: $LULL_BENCH_API_KEY, else the first configured key)")
    parser.add_argument("--ray-address", default=None, help="Ray address (default: the `lull up` platform's)")


def endpoints(args) -> tuple[str, str, str]:
    """REST URL, gRPC target, Ray address: flags first, then `lull up`'s state file and the config."""
    from proto.config import load_config
    from controller.assembly.local_platform import read_state

    config = load_config()
    state = read_state() if args.url is None or args.ray_address is None else {}
    url = args.url or f"http://127.0.0.1:{state['port']}"
    target = args.grpc_target or f"127.0.0.1:{config.gateway.grpc_port}"
    return url, target, args.ray_address or state["address"]


def api_key(args) -> str | None:
    if args.api_key:
        return args.api_key
    from proto.config import load_config

    keys = load_config().secrets.api_keys
    return next(iter(keys.values()), None) if keys else None


def client_factory(args, url: str, target: str, key: str | None):
    """A maker of the ``--api`` client (one per policy run); the chat tokenizer is loaded once."""
    from loadgen.clients import ChatClient, GrpcClient, RestClient, load_tokenizer

    if args.api == "chat":
        if args.tokenizer is None:
            from controller.assembly.settings import model_dir
            from proto.config import load_config

            args.tokenizer = model_dir(load_config())
        tokenizer = load_tokenizer(args.tokenizer)
        return lambda: ChatClient(url, tokenizer, key)
    return lambda: RestClient(url, key) if args.api == "completions" else GrpcClient(target, key)


def policy_memory(policy: str, gpu: int, store: int, shared_fraction: float, replicas: int) -> dict:
    """The tokens ``policy`` books per replica: DRAM homes and the cluster's shared tier,
    from the DRAM store left after the GPU tier's write-through copies (module doc)."""
    budget = store - gpu
    if budget <= 0:
        raise ValueError(f"the DRAM store holds {store:,} tokens per replica, no more than the GPU tier's "
                         f"write-through copies ({gpu:,}): give the DRAM tier more (lull up --set "
                         "tiers.dram_capacity_gib=...)")
    definition = POLICY_DEFINITIONS.get(policy)
    shared = round(budget * shared_fraction) if definition.shared_tier else 0
    books = budget - shared if definition.moves_kv else None
    return {"gpu_per_replica": gpu, "dram_store_per_replica": store, "dram_books_per_replica": books,
            "shared_books": shared * replicas if definition.shared_tier else None, "off_gpu_per_replica": budget}


async def probe_costs(platform: Platform, replica_id: str, tokens: int, tries: int = PROBES) -> dict:
    """What recomputing a ``tokens``-long context costs on this engine against a hit in its
    cache, as ``lull bench-kv`` measures it: time to first token of a fresh prompt, then of
    the same prompt with a few more tokens (a prefix-cache hit), asked of the engine
    directly; the medians of ``PROBES`` tries, each on new token ids."""
    cold, warm = [], []
    for _ in range(tries):
        rng = random.Random(time.time_ns())
        ids = [rng.randrange(20, 1000) for _ in range(tokens)]
        cold.append(await platform.engine_ttft(replica_id, ids))
        warm.append(await platform.engine_ttft(replica_id, ids + [rng.randrange(20, 1000) for _ in range(16)]))
    return {"tokens": tokens, "recompute_s": statistics.median(cold), "hit_s": statistics.median(warm)}


async def bench(args, console: Console) -> tuple[list[dict], list[tuple[str, bool]], list[str]]:
    from proto.config import load_config

    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown:
        raise ValueError(f"--policy takes a comma list of {', '.join(POLICIES)}; got {args.policy!r}")
    url, target, address = endpoints(args)
    platform = Platform(address)
    replicas = await platform.replicas()
    ids = [r["replica_id"] for r in replicas]
    gpu = check_equal_capacity({r["replica_id"]: r["gpu_tokens"] for r in replicas}, await platform.engine_caches(ids))
    per_node = max(sum(1 for r in replicas if r["node_id"] == n["node_id"]) for n in replicas)
    store = min(r["dram_tokens"] for r in replicas) // per_node
    memory = {p: policy_memory(p, gpu, store, args.shared_fraction, len(ids)) for p in policies}
    shared_room = (await platform.controller.launch_options.remote())["shared_tokens"]
    if any((m["shared_books"] or 0) > shared_room for m in memory.values()):
        raise ValueError(f"the shared tier holds {shared_room:,} tokens, fewer than the bench books there; "
                         "lower --shared-fraction or raise tiers.shared_capacity_gib")
    cap = min(gpu, args.max_context)  # calls are compacted to what one prompt may hold, as agents do
    workload = build_workload(load_sessions(args.trace_dir, limit=args.trace_limit), context_window=cap,
                              seed=args.seed, token_scale=args.token_scale, max_tokens=None)
    contexts = [min(c.input_tokens, cap - args.max_output) for s in workload.sessions for c in s.calls]
    mean_context = sum(contexts) / len(contexts)
    make_client = client_factory(args, url, target, api_key(args))
    probe = await probe_costs(platform, ids[0], int(mean_context))
    tick_s = load_config().policy.tick_seconds * args.time_scale
    records = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[calls]} calls, "
               "{task.fields[errors]} errors"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        for index, policy in enumerate(policies):
            m = memory[policy]
            await platform.switch(policy, tick_s, m["off_gpu_per_replica"] if m["dram_books_per_replica"] is None
                                  else m["dram_books_per_replica"], m["shared_books"] or 0,
                                  say=progress.console.print)
            await platform.wait_engines_free(ids)  # every policy starts on the whole GPU tier
            # The machine is shared: how fast the engine is right now, beside this run's figures.
            speed = await probe_costs(platform, ids[0], int(mean_context), tries=1)
            record = await _run_policy(platform, make_client(), policy, index, args, ids, workload, progress, gpu)
            records.append({**record, "capacity_tokens": m, "tick_s": tick_s, "mean_context_tokens": mean_context,
                            "engine_speed_at_start": speed})
    checks = pressure_checks(records, mean_context, probe)
    header = [f"All figures are **{LABEL}**: {len(ids)} replica(s), {args.programs} closed-loop programs per "
              f"replica over the {args.api} API, {args.duration:g} s per policy, gaps and tick x{args.time_scale:g} "
              f"(tick {tick_s:g} s), tokens x{args.token_scale:g}, contexts compacted to {cap:,} tokens. "
              f"Workload: {workload.notes}.",
              f"Memory: GPU tier {gpu:,} tokens per replica = the engine's KV cache (checked against vLLM's "
              f"cache_config_info); DRAM store {store:,} tokens per replica for every policy, of which the GPU "
              f"tier's write-through copies may take {gpu:,}; the remaining {store - gpu:,} are the off-GPU "
              f"budget (lull: DRAM + shared, split {1 - args.shared_fraction:g}/{args.shared_fraction:g}; "
              f"mori: all DRAM). lull's shared tier lives in Redis, outside the DRAM store."]
    return records, checks, header


async def _run_policy(platform: Platform, client, policy: str, index: int, args, ids: list[str], workload,
                      progress, gpu: int) -> dict:
    """One policy's replay, with tier occupancy sampled throughout and the counters read around it."""
    # New tokens (ids or filler words) differ per run (seeded by the run and the clock), sizes
    # and order do not: no run finds an earlier run's prompts in the engine's cache or DRAM.
    settings = ReplaySettings(programs=args.programs * len(ids), duration_s=args.duration,
                              time_scale=args.time_scale, max_context=args.max_context,
                              max_output=args.max_output, seed=(args.seed * 1000 + index) * 1_000_003 + time.time_ns(),
                              session_prefix=f"bench-{policy}-{int(time.time())}")
    task = progress.add_task(policy, total=args.duration, calls=0, errors=0)
    samples: list[tuple[float, int, int, int]] = []
    began = time.monotonic()
    counted = {"calls": 0}

    def on_call(_record):
        counted["calls"] += 1
        progress.update(task, calls=counted["calls"])

    async def sample():
        while True:
            snap, texts = await asyncio.gather(platform.snapshot(), platform.engine_metrics(ids))
            used, t = tier_use(snap), time.monotonic() - began
            samples.append((t, _engine_blocks_in_use(texts.values()), used["dram"], used["shared"]))
            progress.update(task, completed=min(t, args.duration))
            await asyncio.sleep(SAMPLE_S)

    before, counters_before = await platform.move_bytes(), await platform.counters(ids)
    sampler = asyncio.create_task(sample())
    try:
        result = await replay(workload, client, settings, on_call=on_call)
    finally:
        sampler.cancel()
        await client.close()
    after, counters_after = await platform.move_bytes(), await platform.counters(ids)
    progress.update(task, completed=args.duration, errors=len(result.errors))
    summary = result.summary()
    figures = run_figures(counter_delta(counters_before, counters_after), summary["duration_s"], len(ids), gpu)
    hbm_dram, dram_shared = moved(before, after)
    notes = [] if hbm_dram is not None else ["bytes moved: null, no node agent reported lull:kv_move_bytes"]
    return {
        "policy": policy, "simulated": False, "profile": "live-cpu", "label": LABEL,
        "programs_per_replica": args.programs, "replicas": len(ids), "api": args.api, "arrival": "closed",
        "seed": args.seed, "time_scale": args.time_scale, "token_scale": args.token_scale, **summary, **figures,
        "bytes_hbm_dram": hbm_dram, "bytes_dram_shared": dram_shared,
        "occupancy": {"t_s": [s[0] for s in samples], "gpu_tokens": [s[1] for s in samples],
                      "dram_tokens": [s[2] for s in samples], "shared_tokens": [s[3] for s in samples]},
        "workload": workload.notes, "error_samples": result.errors[:5], "notes": notes,
    }


def _engine_blocks_in_use(texts) -> int:
    """The KV tokens the engines hold in blocks in use (vLLM's kv_cache_usage_perc x its cache)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for text in texts:
        cache = engine_cache(text)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "vllm:kv_cache_usage_perc" and cache is not None:
                    total += sample.value * cache.tokens
    return int(total)


def run(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.programs < 1:
        raise ValueError("--duration must be > 0 and --programs >= 1")
    if not 0 <= args.shared_fraction < 1:
        raise ValueError(f"--shared-fraction must be in [0, 1), got {args.shared_fraction}")
    console = Console(stderr=True)
    records, checks, header = asyncio.run(bench(args, console))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([{**r, "pressure_checks": checks} for r in records], indent=1))
    print(markdown_table(records))
    print()
    print(hit_table(records))
    print()
    print(time_table(records))
    print()
    for text, ok in checks:
        print(f"[{'x' if ok else ' '}] {text}")
    for line in goal_lines(records):
        print(line)
    failed = sum(r["calls_failed"] for r in records)
    console.print(f"{LABEL}; {sum(r['requests_completed'] for r in records)} calls, {failed} failed; wrote {args.json}")
    if args.report is not None:
        for path in write_report(args.report, records, checks, header):
            console.print(f"wrote {path}")
    return 0 if failed == 0 else 1

