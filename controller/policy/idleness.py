"""Idleness of one session: ι = T_tool / (T_tool + T_llm) over its last k cycles.

A cycle is one LLM call followed by the gap before the next request (a tool call or
a human turn; both are time the session's KV sits unused). ι is a ratio of sums,
not a mean of per-cycle ratios, so a long tool call weighs by its length.

- The elapsed time of a tool call in progress counts as tool time, so a session
  grows more idle the longer its tool runs, and the ranking moves with it.
- The elapsed time of an LLM call in progress counts as LLM time, symmetrically.
- Time the platform held the session (its request gated, waiting for GPU capacity)
  counts in neither term: the session was not idle by choice, and counting it would
  make gating self-reinforcing (gated -> looks idle -> stays gated).
- A session with no LLM time yet has ι = 0. It is new and about to make (or making)
  its first call; with T_tool = 0 the ratio is 0 for any T_llm > 0, and 0 extends
  that by continuity. Ranking newcomers busy is also the right bet: half of all tool
  gaps are under 10 s, so evicting a session before its first reuse would recompute
  its prompt almost at once.
"""

from __future__ import annotations

from collections import deque

from controller.policy.types import Phase

DEFAULT_CYCLES = 5


class IdlenessHistory:
    """The timeline of one session, fed by events with the clock passed in."""

    __slots__ = ("_cycles", "_phase", "_since", "calls_completed")

    def __init__(self, k: int = DEFAULT_CYCLES) -> None:
        if k < 1:
            raise ValueError(f"idleness window k must be >= 1, got {k}")
        # Each entry is [llm_seconds, tool_seconds] of one cycle; the newest may be
        # open (its LLM call or its gap still running, accounted from ``_since``).
        self._cycles: deque[list[float]] = deque(maxlen=k)
        self._phase = Phase.TOOL
        self._since: float | None = None  # start of the current LLM call or gap
        self.calls_completed = 0

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def is_new(self) -> bool:
        return not self._cycles

    def request_arrived(self, now: float) -> None:
        """The gap that ran since the last call ended closes here."""
        if self._phase is not Phase.TOOL:
            raise ValueError(f"a request arrived while the session is {self._phase.value}")
        if self._since is not None:
            self._cycles[-1][1] = _elapsed(self._since, now)
        self._phase, self._since = Phase.GATED, now

    def call_started(self, now: float) -> None:
        """The engine starts the call; the gated wait before it is dropped."""
        if self._phase is not Phase.GATED:
            raise ValueError(f"a call started while the session is {self._phase.value}")
        self._cycles.append([0.0, 0.0])
        self._phase, self._since = Phase.LLM, now

    def call_finished(self, now: float) -> None:
        if self._phase is not Phase.LLM:
            raise ValueError(f"a call finished while the session is {self._phase.value}")
        self._cycles[-1][0] = _elapsed(self._since, now)
        self._phase, self._since = Phase.TOOL, now
        self.calls_completed += 1

    def call_aborted(self, now: float) -> None:
        """The engine lost the call (a replica died); the request waits again.

        The lost call's time counts as LLM time: the session was busy.
        """
        if self._phase is not Phase.LLM:
            raise ValueError(f"a call aborted while the session is {self._phase.value}")
        self._cycles[-1][0] = _elapsed(self._since, now)
        self._phase, self._since = Phase.GATED, now

    def call_abandoned(self, now: float) -> None:
        """The admitted call never reached the engine (its caller left): as if its request had
        been withdrawn at the gate. The cycle its start opened is dropped (an older cycle the
        full window let go then stays gone: one cycle fewer, not a wrong one)."""
        if self._phase is not Phase.LLM:
            raise ValueError(f"a call was abandoned while the session is {self._phase.value}")
        self._cycles.pop()
        self._phase = Phase.GATED
        self.request_withdrawn(now)

    def request_withdrawn(self, now: float) -> None:
        """The gated request was given up (gate timeout, client gone): the gap it
        closed runs on. The gated wait counts in neither term, so the gap's start
        shifts by it."""
        if self._phase is not Phase.GATED:
            raise ValueError(f"a request was withdrawn while the session is {self._phase.value}")
        if self._cycles:
            gap, self._cycles[-1][1] = self._cycles[-1][1], 0.0  # open again: accounted from _since
            self._phase, self._since = Phase.TOOL, now - gap
        else:
            self._phase, self._since = Phase.TOOL, None

    def expected_gap(self, now: float) -> float:
        """How long the session's KV is expected to sit unused from now on: the mean of
        its closed gaps, or the gap running now if that is already longer (0 when new)."""
        gaps = [tool for _, tool in self._cycles]
        running = 0.0
        if self._phase is Phase.TOOL and self._since is not None:
            gaps.pop()  # the open one, accounted from _since
            running = _elapsed(self._since, now)
        return max(sum(gaps) / len(gaps) if gaps else 0.0, running)

    def idleness(self, now: float) -> float:
        tool = llm = 0.0
        for llm_s, tool_s in self._cycles:
            llm += llm_s
            tool += tool_s
        if self._phase is Phase.TOOL and self._since is not None:
            tool += _elapsed(self._since, now)
        elif self._phase is Phase.LLM:
            llm += _elapsed(self._since, now)
        total = tool + llm
        return tool / total if total > 0.0 else 0.0


def _elapsed(since: float, now: float) -> float:
    # A clock never runs backwards here; a negative span means events were fed out
    # of order, which would silently corrupt the ranking.
    if now < since:
        raise ValueError(f"clock went backwards: {now} < {since}")
    return now - since
