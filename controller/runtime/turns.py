"""Calls of one session take turns: first come, first served, one at a time.

The books hold one request per session (its reservation, its phase), so a call that
arrives while the session's previous call runs, waits at the gate, or is being closed
waits here for its turn, within its gate timeout; it is never refused for that. Parallel
sub-agents that share a session id thus run their calls one after another.

Who calls what: ``LiveController.admit`` awaits ``take`` before its request enters the
books; the live controller calls ``pass_on`` after every event that may have freed a
session (a call's end or failure, a withdrawal, a release) and ``fail`` when a session is
closed. One event loop; no clock of its own (timeouts are the loop's).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

WAITING_FOR_TURN = "waiting for the session's previous call to end"


class TurnTimeout(TimeoutError):
    """The session's previous call did not end within the caller's timeout."""


class SessionTurns:
    def __init__(self, busy: Callable[[str], bool]) -> None:
        """``busy(session_id)``: the session has a call running or gated, or is closing."""
        self._busy = busy
        self._queues: dict[str, deque[asyncio.Future]] = {}
        # Sessions whose turn was handed to a queued call that has not resumed yet: the
        # books do not show its request until it does, so nobody else may start meanwhile.
        self._handed: set[str] = set()

    def holds(self, session_id: str) -> bool:
        """A call of the session waits for its turn or was just handed it."""
        return session_id in self._queues or session_id in self._handed

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def take(self, session_id: str, timeout_s: float) -> None:
        """Return once it is this call's turn (at once when the session is free and nobody
        queues). Raises ``TurnTimeout`` after ``timeout_s``, or the error ``fail`` gave.
        The caller must put its request in the books before it next awaits."""
        if not self.holds(session_id) and not self._busy(session_id):
            return
        turn = asyncio.get_running_loop().create_future()
        self._queues.setdefault(session_id, deque()).append(turn)
        try:
            await asyncio.wait({turn}, timeout=timeout_s)
        except asyncio.CancelledError:
            self._leave(session_id, turn)
            raise
        if not turn.done():
            self._leave(session_id, turn)
            raise TurnTimeout(WAITING_FOR_TURN)
        if turn.exception() is not None:
            raise turn.exception()
        self._handed.discard(session_id)

    def _leave(self, session_id: str, turn: asyncio.Future) -> None:
        if not turn.done():
            queue = self._queues[session_id]
            queue.remove(turn)
            if not queue:
                del self._queues[session_id]
            turn.cancel()
        elif turn.exception() is None:  # handed to this call just as it left: the next one's
            self._handed.discard(session_id)
            self.pass_on()

    def pass_on(self) -> None:
        """Hand the turn to the first queued call of every session that is free now."""
        for session_id in [s for s in self._queues if s not in self._handed and not self._busy(s)]:
            queue = self._queues[session_id]
            turn = queue.popleft()
            if not queue:
                del self._queues[session_id]
            turn.set_result(None)
            self._handed.add(session_id)

    def fail(self, session_id: str, error: Exception) -> None:
        """Every call queued for the session fails with ``error`` (the session was closed)."""
        for turn in self._queues.pop(session_id, ()):
            turn.set_exception(error)

    def check_integrity(self) -> None:
        for session_id, queue in self._queues.items():
            assert queue and not any(t.done() for t in queue), f"{session_id}: a stale turn queued"
            assert session_id in self._handed or self._busy(session_id), f"{session_id} is free, its calls queue"
