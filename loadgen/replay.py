"""Closed-loop replay of the traces against a running Lull platform (MORI's protocol, live).

N programs per replica. Each program replays one trace session: it sends the
session's LLM calls through Lull's public API, sleeping the recorded (scaled)
tool or human gap between them, and when the session ends starts the next
one. A call's prompt is what an agent would send: the previous prompt and
output (the part the trace says is reused) followed by new tokens, so the
platform's KV reuse is exercised for real.

The client decides what goes over the wire (``loadgen.conversation``): chat
messages in text (``/v1/chat/completions``, the path agents use, sized with the
model's tokenizer and chat template) or token ids (``/v1/completions`` and gRPC,
the trace's sizes exactly).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from loadgen.conversation import Conversation
from loadgen.sim.workload import Workload


@dataclass(frozen=True)
class CallOutcome:
    ttft_s: float
    output_ids: list[int]  # the answer's token ids; [] where the API returns text only
    cached_tokens: int  # prompt tokens served from KV; -1 when the reply does not say
    text: str = ""  # the answer's text, where the API returns text
    prompt_tokens: int | None = None  # as the server counted them; None: the client's count stands
    output_tokens: int | None = None  # as the server counted them; None: len(output_ids)


class Client(Protocol):
    """One LLM call of a session through Lull's API (chat, completions or gRPC)."""

    def conversation(self, settings: "ReplaySettings", rng: random.Random) -> Conversation:
        """A new session's history, in the form ``call`` sends; one per session."""

    async def call(self, session_id: str, prompt: Any, max_tokens: int) -> CallOutcome: ...

    async def close_session(self, session_id: str) -> None: ...


@dataclass(frozen=True)
class ReplaySettings:
    programs: int
    duration_s: float
    time_scale: float = 0.05  # gaps are multiplied by this (CPU engines are slow; keep the loop short)
    max_context: int = 2000  # prompt + output cap: longer contexts are compacted, as agents do
    max_output: int = 32
    vocab: tuple[int, int] = (20, 1000)  # new prompt tokens are drawn from this id range
    seed: int = 0  # seeds the token ids only: sizes and order come from the workload
    session_prefix: str = "bench"

    def __post_init__(self):
        if self.programs < 1 or self.duration_s <= 0 or self.time_scale < 0:
            raise ValueError("programs >= 1, duration_s > 0 and time_scale >= 0 are required")
        if self.max_context <= self.max_output + 32:
            raise ValueError(f"max_context {self.max_context} leaves no room for a prompt")


@dataclass
class CallRecord:
    program: int
    session_id: str
    started_s: float  # since the replay began
    ttft_s: float
    prompt_tokens: int
    output_tokens: int
    reused_tokens: int  # prefix the previous call's KV could serve
    cached_tokens: int  # what the platform actually served from KV; -1: the reply did not say


@dataclass
class ReplayResult:
    duration_s: float
    calls: list[CallRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sessions_completed: int = 0

    def summary(self) -> dict:
        """The figures ``lull sim`` reports, under the same keys (percentiles as numpy's)."""
        ttft = np.asarray([c.ttft_s for c in self.calls], dtype=float)
        known = all(c.cached_tokens >= 0 for c in self.calls)  # a client may not learn it (-1)
        if not len(ttft):
            ttft = np.zeros(1)  # as the simulator does for a run with no completed call
        return {
            "duration_s": round(self.duration_s, 3),
            "requests_completed": len(self.calls),
            "errors": len(self.errors),
            "sessions_completed": self.sessions_completed,
            "output_tokens_per_s": sum(c.output_tokens for c in self.calls) / self.duration_s,
            "requests_per_s": len(self.calls) / self.duration_s,
            "ttft_mean_s": float(ttft.mean()),
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            # Reusable prefix the platform did not serve from KV: it was recomputed.
            "recompute_tokens": sum(max(0, c.reused_tokens - c.cached_tokens) for c in self.calls) if known else None,
            "reuse_hit_tokens": sum(min(c.reused_tokens, c.cached_tokens) for c in self.calls) if known else None,
            "prefill_tokens": sum(c.prompt_tokens - c.cached_tokens for c in self.calls) if known else None,
        }


async def replay(workload: Workload, client: Client, settings: ReplaySettings,
                 on_call: Callable[[CallRecord], None] | None = None) -> ReplayResult:
    """Run the closed loop for settings.duration_s; calls in flight at the end finish and count."""
    began = time.monotonic()
    deadline = began + settings.duration_s
    result = ReplayResult(duration_s=settings.duration_s)

    async def program(p: int) -> None:
        script = workload.program_sessions(p, settings.programs)
        rng = random.Random(settings.seed * 1_000_003 + p)
        n = 0
        while time.monotonic() < deadline:
            spec = script.next_session()
            session_id = f"{settings.session_prefix}-{p}-{n}"
            n += 1
            try:
                if await run_session(p, session_id, spec.calls, rng):
                    result.sessions_completed += 1
            finally:
                try:
                    await client.close_session(session_id)
                except Exception as error:  # a failed close must not stop the other programs
                    result.errors.append(f"{session_id}: close: {type(error).__name__}: {str(error)[:200]}")

    async def run_session(p: int, session_id: str, calls, rng: random.Random) -> bool:
        """The session's calls in order; False when the deadline or an error cut it short."""
        conversation = client.conversation(settings, rng)
        for call in calls:
            # A long tool gap is cut at the deadline instead of holding the replay past it.
            await asyncio.sleep(max(0.0, min(call.gap_s * settings.time_scale, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                return False
            max_tokens = max(1, min(call.output_tokens, settings.max_output))
            # The call's prompt is compacted to what the context cap leaves room for.
            prompt = conversation.prompt(min(call.input_tokens, settings.max_context - max_tokens), call.reuse_tokens)
            sent = time.monotonic()
            try:
                outcome = await client.call(session_id, prompt.body, max_tokens)
            except Exception as error:  # counted and reported, never fatal to the replay
                result.errors.append(f"{session_id}: {type(error).__name__}: {str(error)[:200]}")
                return False
            record = CallRecord(p, session_id, sent - began, outcome.ttft_s,
                                prompt.tokens if outcome.prompt_tokens is None else outcome.prompt_tokens,
                                len(outcome.output_ids) if outcome.output_tokens is None else outcome.output_tokens,
                                prompt.reused, outcome.cached_tokens)
            result.calls.append(record)
            if on_call:
                on_call(record)
            conversation.answered(outcome.output_ids, outcome.text)
        return True

    await asyncio.gather(*(program(p) for p in range(settings.programs)))
    result.duration_s = time.monotonic() - began
    return result

