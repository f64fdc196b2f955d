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

The replay stops at its deadline, whatever is in flight: a call that has not
produced its first token by then is *censored* (its wait so far counts as its time
to first token, a lower bound), one that is streaming counts the tokens it produced
by then. So a policy that holds calls at a gate, or an engine that thrashes, cannot
hide its waits past the end of the run, and every run measures the same span.
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

ZERO_PROGRESS_SPAN = 0.8  # a session begun in this first part of a run that completed no call made no progress


@dataclass(frozen=True)
class CallOutcome:
    ttft_s: float
    output_ids: list[int]  # the answer's token ids; [] where the API returns text only
    cached_tokens: int  # prompt tokens served from KV; -1 when the reply does not say
    text: str = ""  # the answer's text, where the API returns text
    prompt_tokens: int | None = None  # as the server counted them; None: the client's count stands
    output_tokens: int | None = None  # as the server counted them; None: len(output_ids)


@dataclass
class CallProgress:
    """What a call in flight has got so far; the client updates it as the stream arrives
    (the replay reads it when the deadline cuts the call)."""

    first_token_at: float | None = None  # time.monotonic() of the first token
    output_tokens: int = 0  # tokens (stream chunks with content) received so far

    def token(self, count: int = 1) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.output_tokens += count


class Client(Protocol):
    """One LLM call of a session through Lull's API (chat, completions or gRPC)."""

    def conversation(self, settings: "ReplaySettings", rng: random.Random) -> Conversation:
        """A new session's history, in the form ``call`` sends; one per session."""

    async def call(self, session_id: str, prompt: Any, max_tokens: int,
                   progress: CallProgress | None = None) -> CallOutcome: ...

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
class Unserved:
    """A call the run did not complete: it failed, or the deadline cut it."""

    program: int
    session_id: str
    started_s: float
    waited_s: float  # until its first token, or (none came) until it failed or the run ended
    output_tokens: int  # produced before the cut (0 for a failure)
    got_first_token: bool
    failed: bool


@dataclass
class ReplayResult:
    duration_s: float
    programs: int = 1
    calls: list[CallRecord] = field(default_factory=list)
    unserved: list[Unserved] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sessions_completed: int = 0
    sessions_started: dict[str, float] = field(default_factory=dict)  # session -> its first call's send time

    def summary(self) -> dict:
        """The figures ``lull sim`` reports, under the same keys (percentiles as numpy's), and
        what was not served. ``ttft_*`` is censored: a call without a first token by the end
        (failed, gated, or queued) counts the time it waited; ``ttft_served_mean_s`` only the
        completed calls."""
        served = [c.ttft_s for c in self.calls] + [u.waited_s for u in self.unserved if u.got_first_token]
        censored = np.asarray(served + [u.waited_s for u in self.unserved if not u.got_first_token], dtype=float)
        known = all(c.cached_tokens >= 0 for c in self.calls)  # a client may not learn it (-1)
        output = sum(c.output_tokens for c in self.calls) + sum(u.output_tokens for u in self.unserved)
        per_program = [0] * self.programs
        for c in self.calls:
            per_program[c.program] += 1
        progressed = {c.session_id for c in self.calls}
        return {
            "duration_s": round(self.duration_s, 3),
            "requests_completed": len(self.calls),
            "errors": len(self.errors),
            "calls_failed": sum(u.failed for u in self.unserved),
            "calls_cut": sum(not u.failed for u in self.unserved),
            "calls_censored": sum(not u.got_first_token for u in self.unserved),
            "sessions_completed": self.sessions_completed,
            # Sessions begun early enough to have completed a call (the first 80% of the run), with none.
            "sessions_zero_progress": sum(1 for s, t in self.sessions_started.items()
                                          if s not in progressed and t < ZERO_PROGRESS_SPAN * self.duration_s),
            "program_calls_min": min(per_program),
            "program_calls_median": float(np.median(per_program)),
            "starved_programs": sum(1 for n in per_program if n == 0),
            "output_tokens_per_s": output / self.duration_s,
            "requests_per_s": len(self.calls) / self.duration_s,
            **_percentiles("ttft", censored if len(censored) else np.zeros(1)),
            "ttft_served_mean_s": float(np.mean([c.ttft_s for c in self.calls])) if self.calls else None,
            "ttft_censored_s": sorted(float(x) for x in censored),
            # Reusable prefix the platform did not serve from KV: it was recomputed.
            "recompute_tokens": sum(max(0, c.reused_tokens - c.cached_tokens) for c in self.calls) if known else None,
            "reuse_hit_tokens": sum(min(c.reused_tokens, c.cached_tokens) for c in self.calls) if known else None,
            "prefill_tokens": sum(c.prompt_tokens - c.cached_tokens for c in self.calls) if known else None,
        }


def _percentiles(name: str, values: np.ndarray) -> dict[str, float]:
    return {f"{name}_mean_s": float(values.mean()), f"{name}_p50_s": float(np.percentile(values, 50)),
            f"{name}_p99_s": float(np.percentile(values, 99))}


async def replay(workload: Workload, client: Client, settings: ReplaySettings,
                 on_call: Callable[[CallRecord], None] | None = None) -> ReplayResult:
    """Run the closed loop for settings.duration_s, then cut what is in flight (see the module doc)."""
    return await _Replay(workload, client, settings, on_call).run()


class _Replay:
    def __init__(self, workload: Workload, client: Client, settings: ReplaySettings,
                 on_call: Callable[[CallRecord], None] | None) -> None:
        self.workload, self.client, self.settings, self.on_call = workload, client, settings, on_call
        self.began = time.monotonic()
        self.deadline = self.began + settings.duration_s
        self.result = ReplayResult(duration_s=settings.duration_s, programs=settings.programs)
        self.inflight: dict[int, tuple[str, float, CallProgress]] = {}  # program -> its call in flight
        self.opened: list[str] = []  # sessions not closed yet

    async def run(self) -> ReplayResult:
        tasks = [asyncio.create_task(self.program(p)) for p in range(self.settings.programs)]
        done, running = await asyncio.wait(tasks, timeout=max(0.0, self.deadline - time.monotonic()))
        ended = time.monotonic()
        for p, (session_id, sent, progress) in self.inflight.items():  # cut at the deadline: censored or partial
            waited = (progress.first_token_at or ended) - sent
            self.result.unserved.append(Unserved(p, session_id, sent - self.began, waited, progress.output_tokens,
                                                 progress.first_token_at is not None, failed=False))
        for task in running:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                self.result.errors.append(f"program: {type(task.exception()).__name__}: {task.exception()}")
        await asyncio.gather(*(self.close(s) for s in list(self.opened)))  # sessions the cut left open
        self.result.duration_s = ended - self.began
        return self.result

    async def program(self, p: int) -> None:
        script = self.workload.program_sessions(p, self.settings.programs)
        rng = random.Random(self.settings.seed * 1_000_003 + p)
        n = 0
        while time.monotonic() < self.deadline:
            spec = script.next_session()
            session_id = f"{self.settings.session_prefix}-{p}-{n}"
            n += 1
            self.opened.append(session_id)
            if await self.run_session(p, session_id, spec.calls, rng):
                self.result.sessions_completed += 1
            await self.close(session_id)

    async def close(self, session_id: str) -> None:
        try:
            await self.client.close_session(session_id)
        except Exception as error:  # a failed close must not stop the other programs
            self.result.errors.append(f"{session_id}: close: {type(error).__name__}: {str(error)[:200]}")
        if session_id in self.opened:
            self.opened.remove(session_id)

    async def run_session(self, p: int, session_id: str, calls, rng: random.Random) -> bool:
        """The session's calls in order; False when the deadline or an error cut it short."""
        settings, result = self.settings, self.result
        conversation = self.client.conversation(settings, rng)
        for call in calls:
            # A long tool gap is cut at the deadline instead of holding the replay past it.
            await asyncio.sleep(max(0.0, min(call.gap_s * settings.time_scale, self.deadline - time.monotonic())))
            if time.monotonic() >= self.deadline:
                return False
            max_tokens = max(1, min(call.output_tokens, settings.max_output))
            # The call's prompt is compacted to what the context cap leaves room for.
            prompt = conversation.prompt(min(call.input_tokens, settings.max_context - max_tokens), call.reuse_tokens)
            sent, progress = time.monotonic(), CallProgress()
            result.sessions_started.setdefault(session_id, sent - self.began)
            self.inflight[p] = (session_id, sent, progress)
            try:
                outcome = await self.client.call(session_id, prompt.body, max_tokens, progress=progress)
            except Exception as error:  # counted and reported, never fatal to the replay
                del self.inflight[p]
                result.errors.append(f"{session_id}: {type(error).__name__}: {str(error)[:200]}")
                waited = (progress.first_token_at or time.monotonic()) - sent
                result.unserved.append(Unserved(p, session_id, sent - self.began, waited, 0,
                                                progress.first_token_at is not None, failed=True))
                return False
            del self.inflight[p]
            record = CallRecord(p, session_id, sent - self.began, outcome.ttft_s,
                                prompt.tokens if outcome.prompt_tokens is None else outcome.prompt_tokens,
                                len(outcome.output_ids) if outcome.output_tokens is None else outcome.output_tokens,
                                prompt.reused, outcome.cached_tokens)
            result.calls.append(record)
            if self.on_call:
                self.on_call(record)
            conversation.answered(outcome.output_ids, outcome.text)
        return True
