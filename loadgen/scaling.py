"""Scaling real trace sessions down to what a test bed can serve, keeping their shape.

A real Claude Code session holds ~100k tokens of context and runs for hours; a CPU
engine with a tiny model serves a few thousand tokens and a test runs for minutes.
``scale_session`` shrinks tokens and time and cuts a window of calls, but keeps what
the idleness ranking feeds on: the order and kinds of gaps, their relative lengths,
and the prefix sharing between consecutive calls.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from loadgen.traces import BlockIds, GapKind, TraceCall, TraceSession


@dataclass(frozen=True, slots=True)
class ScaleSpec:
    """How to shrink a session. Validated at construction."""

    token_scale: float = 1.0  # multiplies input and output tokens (rounded, at least 1)
    time_scale: float = 1.0  # multiplies every time: call starts, api times, gaps, offsets
    context_cap: int | None = None  # tokens of input + output one call may hold, after scaling
    window: int | None = None  # calls kept per session: a consecutive slice from the middle

    def __post_init__(self) -> None:
        for name in ("token_scale", "time_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name, least in (("context_cap", 2), ("window", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an integer >= {least} or None, got {value!r}")


def window_slice(calls: int, window: int | None, seed: int, session_id: str) -> slice:
    """Which calls a window keeps: a slice of consecutive calls from the middle.

    Not the start: a session opens with a burst of back-to-back tool calls on a small,
    growing context. On the shared split, 40-call windows from the start hold 1.17
    human gaps and a median context of 73k tokens per session, windows from the middle
    1.40 and 104k: cutting the start replays a session that is busier and smaller than
    real ones, so the busy/idle alternation the ranking exploits is understated. The
    offset is drawn from the middle half of the possible offsets, seeded by ``seed``
    and the session id so that sessions do not all cut at the same relative place.
    """
    if window is None or calls <= window:
        return slice(0, calls)
    slack = calls - window
    # A str seed is hashed with SHA-512 by random.Random: stable across processes.
    offset = random.Random(f"{seed}/{session_id}").randint(slack // 4, slack - slack // 4)
    return slice(offset, offset + window)


def scale_session(session: TraceSession, spec: ScaleSpec, seed: int = 0) -> TraceSession:
    """A scaled copy of one session; ``seed`` picks its window (deterministically).

    A sub-agent keeps its ``start_s`` (scaled); use ``scale_sessions`` to scale a main
    agent together with its sub-agents, which follow the main agent's window.
    """
    keep = window_slice(len(session.calls), spec.window, seed, session.session_id)
    return _scaled(session, spec, keep, session.start_s * spec.time_scale)


def scale_sessions(sessions: Iterable[TraceSession], spec: ScaleSpec, seed: int = 0) -> list[TraceSession]:
    """Scale main agents and their sub-agents together.

    Sub-agents are not windowed themselves (a window from a sub-agent's middle would
    cut it loose from the parent's tool call that waits for it): one is kept when it
    starts within its parent's window, re-timed to that window, and dropped otherwise.
    """
    by_id = {session.session_id: session for session in sessions}
    windows: dict[str, tuple[float, float]] = {}  # main agent -> its window's time span
    result: list[TraceSession] = []
    kept_ids: set[str] = set()
    for session in sorted(by_id.values(), key=lambda s: _depth(s, by_id)):  # parents first
        root = _root(session, by_id)
        if session is root:
            keep = window_slice(len(session.calls), spec.window, seed, session.session_id)
            kept = session.calls[keep]
            windows[session.session_id] = (kept[0].t, kept[-1].end)
            result.append(_scaled(session, spec, keep, 0.0))
            kept_ids.add(session.session_id)
            continue
        if root is None or session.parent_id not in kept_ids:
            continue
        first, last = windows[root.session_id]  # start_s is on the main agent's clock too
        if first <= session.start_s <= last:
            offset = (session.start_s - first) * spec.time_scale
            result.append(_scaled(session, spec, slice(0, len(session.calls)), offset))
            kept_ids.add(session.session_id)
    result = [_drop_missing_subagents(session, kept_ids) for session in result]
    return sorted(result, key=lambda s: s.session_id)


def _depth(session: TraceSession, by_id: dict[str, TraceSession]) -> int:
    depth = 0
    while session.parent_id is not None and session.parent_id in by_id:
        session, depth = by_id[session.parent_id], depth + 1
    return depth


def _root(session: TraceSession, by_id: dict[str, TraceSession]) -> TraceSession | None:
    """The main agent above a session, or None when a link is missing."""
    while session.parent_id is not None:
        parent = by_id.get(session.parent_id)
        if parent is None:
            return None
        session = parent
    return session


def _drop_missing_subagents(session: TraceSession, kept: set[str]) -> TraceSession:
    calls = tuple(
        dataclasses.replace(call, subagent_ids=tuple(s for s in call.subagent_ids if s in kept))
        if any(s not in kept for s in call.subagent_ids) else call
        for call in session.calls
    )
    return dataclasses.replace(session, calls=calls)


def _scaled(session: TraceSession, spec: ScaleSpec, keep: slice, start_s: float) -> TraceSession:
    calls = session.calls[keep]
    t0 = calls[0].t
    tokens_in = [_tokens(call.input_tokens, spec.token_scale) for call in calls]
    block_ids = _scale_blocks(
        [call.hash_ids for call in calls], [n // session.block_size for n in tokens_in], spec.token_scale
    )
    cap = _ContextCap(spec, session)
    scaled = []
    for index, call in enumerate(calls):
        n_in, n_out, ids = cap.apply(tokens_in[index], _tokens(call.output_tokens, spec.token_scale), block_ids[index])
        first = index == 0
        scaled.append(TraceCall(
            t=(call.t - t0) * spec.time_scale,
            input_tokens=n_in,
            output_tokens=n_out,
            hash_ids=ids,
            api_time=call.api_time * spec.time_scale,
            api_time_measured=call.api_time_measured,
            # The window's first call has no gap: what came before it was cut away.
            gap_s=0.0 if first else call.gap_s * spec.time_scale,
            gap_kind=GapKind.NONE if first else call.gap_kind,
            stop=call.stop,
            model=call.model,
            subagent_ids=() if first else call.subagent_ids,
        ))
    return dataclasses.replace(
        session,
        calls=tuple(scaled),
        start_s=start_s,
        system_tokens=_tokens(session.system_tokens, spec.token_scale) if session.system_tokens else 0,
        tool_tokens=_tokens(session.tool_tokens, spec.token_scale) if session.tool_tokens else 0,
    )


def _tokens(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def _scale_blocks(originals: list[BlockIds], counts: list[int], factor: float) -> list[BlockIds]:
    """The block ids of a session's scaled calls, ``counts[i]`` blocks for call i.

    Scaled block j stands for the original blocks [j/s, (j+1)/s) (s = token scale, the
    block size unchanged; scaling up gives each at least the one it falls in). Its id
    numbers the distinct (j, ids it stands for) of the session in order of first use,
    so two calls share scaled block j exactly when they share those original blocks:
    a shared prefix of k original blocks becomes one of about k*s blocks. Blocks inside
    the prefix a call shares with the previous call copy its ids, so only new blocks
    are looked up (interning every block took ~30 s for the whole set at s = 0.5).
    """
    if factor == 1.0 and all(count == len(ids) for ids, count in zip(originals, counts)):
        return list(originals)
    interned: dict[tuple[int, bytes], int] = {}
    result: list[BlockIds] = []
    for ids, count in zip(originals, counts):
        source = ids.array
        bounds = np.floor(np.arange(count + 1) / factor).astype(np.int64)
        starts = bounds[:-1]
        ends = np.maximum(bounds[1:], starts + 1)
        new = np.empty(count, dtype=np.int64)
        reuse = 0
        if result:
            shared = ids.shared_prefix(originals[len(result) - 1])
            reuse = min(int(np.searchsorted(ends, shared, side="right")), len(result[-1]))
            new[:reuse] = result[-1].array[:reuse]
        for j in range(reuse, count):
            key = (j, source[starts[j] : ends[j]].tobytes())  # a slice past the end is short
            new[j] = interned.setdefault(key, len(interned) + 1)
        new.flags.writeable = False  # ours alone: BlockIds need not copy it
        result.append(BlockIds(new))
    return result


class _ContextCap:
    """Keeps every call within ``context_cap`` tokens the way an agent compacts.

    A sliding window (drop the oldest tokens on every call) would shift every block of
    every call and so destroy the prefix sharing between consecutive calls. Instead,
    when a call would exceed the cap, the oldest history after the system and tool
    prefix is dropped down to half the input budget in one step, and later calls keep
    dropping the same blocks: they share their prefix again until the next overflow.
    The real traces do the same (a 165k context followed by a 38k one in trace_0004).
    Output takes at most a quarter of the cap and input the rest.
    """

    def __init__(self, spec: ScaleSpec, session: TraceSession) -> None:
        self.cap = spec.context_cap
        self.block_size = session.block_size
        if self.cap is None:
            return
        self.out_cap = max(1, self.cap // 4)
        self.in_cap = self.cap - self.out_cap
        prefix_tokens = _tokens(session.system_tokens + session.tool_tokens, spec.token_scale)
        self.head = min(prefix_tokens, self.in_cap // 4) // self.block_size
        self.dropped = 0  # blocks dropped right after the head
        self.previous: BlockIds | None = None  # the previous call's ids before capping

    def apply(self, tokens_in: int, tokens_out: int, ids: BlockIds) -> tuple[int, int, BlockIds]:
        if self.cap is None:
            return tokens_in, tokens_out, ids
        previous, self.previous = self.previous, ids
        if previous is not None and ids.shared_prefix(previous) < self.head + self.dropped:
            self.dropped = 0  # the history the drop was cutting has changed: start afresh
        if tokens_in - self.dropped * self.block_size > self.in_cap:
            target = self.in_cap // 2
            self.dropped = math.ceil((tokens_in - target) / self.block_size)
        self.dropped = min(self.dropped, max(0, len(ids) - self.head))
        tokens_in = min(self.in_cap, max(1, tokens_in - self.dropped * self.block_size))
        kept = np.concatenate([ids.array[: self.head], ids.array[self.head + self.dropped :]])
        kept = kept[: tokens_in // self.block_size]
        kept.flags.writeable = False
        return tokens_in, min(tokens_out, self.out_cap), BlockIds(kept)
