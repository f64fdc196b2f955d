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
from dataclasses import dataclass

from loadgen.scaling import ScaleSpec, scale_session
from loadgen.traces import TraceSession


@dataclass(frozen=True, slots=True)
class CallSpec:
    gap_s: float  # sleep before sending, after the previous call finished (0 for the first)
    input_tokens: int
    output_tokens: int
    reuse_tokens: int  # leading input tokens the previous call's KV already holds
    tool_call: bool = True  # the reply asks for a tool (not the end of a human turn)

    @property
    def need_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


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
    skipped_calls: int  # calls dropped because they exceeded the GPU KV capacity
    notes: str

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


def build_workload(
    sessions: Sequence[TraceSession],
    *,
    gpu_tokens: int,
    seed: int = 0,
    token_scale: float = 1.0,
) -> Workload:
    """Main agents only (see the module doc), scaled by ``token_scale``, shuffled by
    ``seed``. A call whose input + output exceeds the GPU KV capacity cannot run on
    one replica: sessions holding one are compacted to the capacity with
    ``loadgen.scaling``'s agent-like context cap, which drops old history."""
    mains = [s for s in sessions if not s.is_subagent]
    specs = []
    capped = 0
    for session in mains:
        too_big = any(c.context_tokens * token_scale > gpu_tokens for c in session.calls)
        if token_scale != 1.0 or too_big:
            cap = gpu_tokens if too_big else None
            session = scale_session(session, ScaleSpec(token_scale=token_scale, context_cap=cap), seed)
            capped += too_big
        spec = session_spec(session)
        # The cap leaves input + output <= cap; a rounding edge is skipped, not run.
        calls = tuple(c for c in spec.calls if c.need_tokens <= gpu_tokens)
        if calls:
            specs.append(SessionSpec(spec.trace_id, calls))
    random.Random(seed).shuffle(specs)
    skipped = sum(len(s.calls) for s in mains) - sum(len(s.calls) for s in specs)
    notes = (f"{len(specs)} main-agent sessions (sub-agents skipped: their time is the "
             f"parent's tool gap), token scale {token_scale:g}, {capped} sessions compacted "
             f"to the GPU KV capacity of {gpu_tokens:,} tokens, {skipped} calls dropped by it")
    return Workload(tuple(specs), skipped, notes)


def scripted_workload(sessions: Sequence[Sequence[tuple[float, int, int, int]]]) -> Workload:
    """A hand-written workload for tests: each session a list of (gap_s, input,
    output, reuse) calls; program p replays session p (and then the others)."""
    specs = tuple(
        SessionSpec(f"s{i}", tuple(CallSpec(*call) for call in calls))
        for i, calls in enumerate(sessions)
    )
    return Workload(specs, 0, f"{len(specs)} scripted sessions")
