"""The simulator's workload: trace sessions boiled down to what the engine and the
policies need, and the order in which closed-loop programs replay them.

MORI's protocol: N closed-loop programs per replica; each replays one trace session
(sleeping each recorded gap after its previous call *finished in the simulation*),
then starts the next session. Sub-agents are skipped: their run time already sits in
the parent's recorded gap (the parent waits on them as one long tool call), so the
main agent's idleness pattern is kept; their own LLM load is not simulated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from loadgen.scaling import ScaleSpec, scale_session
from loadgen.sim.gaps import GapModel
from loadgen.traces import TraceSession


@dataclass(frozen=True, slots=True)
class CallSpec:
    gap_s: float  # sleep before sending, after the previous call finished (0 for the first)
    input_tokens: int
    output_tokens: int
    reuse_tokens: int  # leading input tokens the previous call's KV already holds
    tool_call: bool = True  # the reply asks for a tool (not the end of a human turn)
    max_tokens: int = 0  # the request's max_tokens (>= output_tokens); 0: the output, an oracle

    @property
    def need_tokens(self) -> int:
        """The KV the call ends with: prompt and the output it produced."""
        return self.input_tokens + self.output_tokens

    @property
    def reserve_tokens(self) -> int:
        """The KV a controller reserves before the call, knowing only the request:
        prompt + max_tokens (exactly ``need_tokens`` with the oracle)."""
        return self.input_tokens + max(self.output_tokens, self.max_tokens)


@dataclass(frozen=True, slots=True)
class SessionSpec:
    trace_id: str
    calls: tuple[CallSpec, ...]


def session_spec(session: TraceSession) -> SessionSpec:
    """Per-call reusable prefix from the block hash ids: equal leading blocks of two
    consecutive calls. When the previous input is a full prefix of this one, the
    previous output is assumed appended too (the agent's transcript grows)."""
    calls = []
    previous = None
    for call in session.calls:
        reuse = 0
        if previous is not None:
            shared = call.hash_ids.shared_prefix(previous.hash_ids)
            reuse = shared * session.block_size
            if shared == len(previous.hash_ids):
                reuse = previous.input_tokens + previous.output_tokens
            reuse = min(reuse, call.input_tokens)
        # An engine call has at least one prompt and one output token; a few traced
        # calls record 0 output tokens (aborted streams).
        calls.append(CallSpec(0.0 if previous is None else call.gap_s, max(1, call.input_tokens),
                              max(1, call.output_tokens), reuse, call.stop != "end_turn"))
        previous = call
    return SessionSpec(session.session_id, tuple(calls))


@dataclass(frozen=True)
class Workload:
    sessions: tuple[SessionSpec, ...]  # main agents, in the seeded replay order
    skipped_calls: int  # calls dropped because they exceeded the context window
    notes: str
    calls: int = 0  # main-agent calls before compaction
    calls_over_window: int = 0  # of them, calls whose prompt + output exceeded the window
    calls_compacted: int = 0  # calls whose prompt or output the compaction shortened

    def program_sessions(self, program: int, programs: int) -> "ProgramScript":
        """Program p replays sessions p, p + P, p + 2P, ... of the seeded order
        (wrapping), so programs start on different sessions and the order is
        the same for every policy."""
        return ProgramScript(self.sessions, program, programs)


class ProgramScript:
    """An endless, deterministic sequence of sessions for one program."""

    def __init__(self, sessions: Sequence[SessionSpec], program: int, programs: int) -> None:
        if not sessions:
            raise ValueError("the workload holds no sessions")
        self._sessions = sessions
        self._next = program
        self._stride = max(1, programs)

    def next_session(self) -> SessionSpec:
        spec = self._sessions[self._next % len(self._sessions)]
        self._next += self._stride
        return spec


DEFAULT_MAX_TOKENS = 8192  # the max_tokens a simulated client sends (an agent's usual order)


def build_workload(
    sessions: Sequence[TraceSession],
    *,
    context_window: int,
    seed: int = 0,
    token_scale: float = 1.0,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    gap_model: str = "trace",
) -> Workload:
    """Main agents only (see the module doc), scaled by ``token_scale``, shuffled by
    ``seed``, every call within ``context_window`` (prompt + output).

    A call above the window would get a 400 from the live gateway (and from vLLM), and
    a compacting agent then shortens its history and retries. Sessions holding one are
    compacted the way ``loadgen.scaling``'s context cap does, as the live benchmarks'
    clients do: when a call would overflow, the oldest history after the system and
    tool prefix is dropped down to half the prompt budget (3/4 of the window) in one
    step, and later calls keep dropping it, so they share their prefix again until the
    next overflow; output is capped at a quarter of the window.

    ``max_tokens``: what each request asks for, cut to the room the window leaves
    (the live gateway refuses more) and never below what the call produced; None: the
    exact output (an oracle no live client has). ``gap_model``: see ``loadgen.sim.gaps``.
    """
    gaps = GapModel(gap_model, seed)
    mains = [s for s in sessions if not s.is_subagent]
    specs = []
    capped = over = changed = 0
    for session in mains:
        over_here = sum(c.context_tokens * token_scale > context_window for c in session.calls)
        scaled = session
        if token_scale != 1.0 or over_here:
            scaled = scale_session(session, ScaleSpec(token_scale=token_scale,
                                                      context_cap=context_window if over_here else None), seed)
            if over_here:
                plain = scale_session(session, ScaleSpec(token_scale=token_scale), seed)
                changed += sum((a.input_tokens, a.output_tokens) != (b.input_tokens, b.output_tokens)
                               for a, b in zip(plain.calls, scaled.calls))
        capped += bool(over_here)
        over += over_here
        spec = session_spec(scaled)
        # The cap leaves input + output <= window; a rounding edge is skipped, not run.
        calls = tuple(_with_max_tokens(c, context_window, max_tokens) for c in spec.calls
                      if c.need_tokens <= context_window)
        calls = tuple(replace(c, gap_s=gaps.gap(c.gap_s)) if i else c for i, c in enumerate(calls))
        if calls:
            specs.append(SessionSpec(spec.trace_id, calls))
    random.Random(seed).shuffle(specs)
    total = sum(len(s.calls) for s in mains)
    skipped = total - sum(len(s.calls) for s in specs)
    asked = "the exact output (oracle)" if max_tokens is None else f"max_tokens {max_tokens:,}"
    notes = (f"{len(specs)} main-agent sessions (sub-agents skipped: their time is the "
             f"parent's tool gap), token scale {token_scale:g}; context window {context_window:,} "
             f"tokens: {over:,} of {total:,} calls ({over / max(1, total):.1%}) exceeded it, so "
             f"{capped} sessions were compacted as an agent does (oldest history after the system "
             f"and tool prefix dropped to half the prompt budget, output capped at a quarter of the "
             f"window), shortening {changed:,} calls ({changed / max(1, total):.1%}); {skipped} calls "
             f"dropped at a rounding edge; each request reserves prompt + {asked}; {gaps.describe()}")
    return Workload(tuple(specs), skipped, notes, total, over, changed)


def _with_max_tokens(call: CallSpec, window: int, max_tokens: int | None) -> CallSpec:
    if max_tokens is None:
        return call
    asked = max(call.output_tokens, min(max_tokens, window - call.input_tokens))
    return replace(call, max_tokens=asked)


def scripted_workload(sessions: Sequence[Sequence[tuple[float, int, int, int]]]) -> Workload:
    """A hand-written workload for tests: each session a list of (gap_s, input,
    output, reuse) calls; program p replays session p (and then the others)."""
    specs = tuple(
        SessionSpec(f"s{i}", tuple(CallSpec(*call) for call in calls))
        for i, calls in enumerate(sessions)
    )
    return Workload(specs, 0, f"{len(specs)} scripted sessions")
