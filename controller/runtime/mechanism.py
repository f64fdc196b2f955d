"""How the live controller carries the driver's plans out (``PlanDriver``'s ``Mechanism``):
bytes through its mover, admissions and closures to the callers waiting at its gate.
Part of ``LiveController``: it reads and updates the controller's waiters."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.policy import Admit, Location, Move, Release, SourceLost
from controller.runtime.contracts import Admission, NotWrittenThrough, SessionClosed

if TYPE_CHECKING:
    from controller.runtime.live import LiveController

log = logging.getLogger(__name__)
# How long after a session's last event its GPU-tier KV may still be on its way to DRAM (the
# connector's write-through); a demotion that finds no copy after that recomputes it instead.
WRITE_THROUGH_GRACE_S = 10.0


@dataclass
class Waiter:
    """A call at the gate: its request is in the books and waits for an admission."""

    future: asyncio.Future
    arrived: float
    reason: str = "waiting for GPU capacity"


class LiveMechanism:
    """Carries the driver's plans out live: bytes through the controller's mover,
    admissions and closures to the callers waiting at the gate."""

    def __init__(self, live: LiveController) -> None:
        self.live = live

    async def release(self, release: Release, free_kv: bool) -> None:
        live, session_id = self.live, release.session_id
        waiter = live._waiters.pop(session_id, None)
        if waiter is not None:
            waiter.future.set_exception(SessionClosed(f"session {session_id!r} was closed while gated"))
            live._observe_wait(waiter, "closed")
        if free_kv and not await live.release_copy(session_id, release.location):
            # The tiers never drop a copy on their own: retried on every tick.
            log.warning("release of %s in %s failed; retried on every tick", session_id, release.location)
            live.unreleased[session_id] = release.location

    async def move(self, move: Move) -> bool:
        live = self.live
        if live.moving is not None:  # a reconciliation is under way: it must not judge this session
            live.moving.add(move.session_id)
        try:
            return bool(await live.mover.move(move, live._node(move.src), live._node(move.dst)))
        except SourceLost:
            raise  # the driver books the session as recomputed
        except NotWrittenThrough as missing:
            record = live.state.sessions.get(move.session_id)
            if record is None or live.clock() - record.active_at < WRITE_THROUGH_GRACE_S:
                return False  # its write-through may be on its way: a later step tries again
            # Refused for good (a full DRAM tier): waiting would hold its GPU room for ever.
            await live.release_copy(move.session_id, move.src)  # the engine's hold on its blocks
            raise SourceLost(f"no written-through copy {WRITE_THROUGH_GRACE_S:.0f} s after its call: {missing}")
        except Exception:
            log.exception("move of %s %s -> %s failed", move.session_id, move.src, move.dst)
            return False

    def admitted(self, admit: Admit, was: Location, kv_tokens: int, now: float) -> None:
        live = self.live
        waiter = live._waiters.pop(admit.session_id, None)
        if waiter is None:  # no one to run it (should not happen): give the room back
            live.call_failed(admit.session_id, started=False)
            return
        waiter.future.set_result(Admission(admit.replica, live.policy.tier_label, now - waiter.arrived))
        live._observe_wait(waiter, "admitted")
