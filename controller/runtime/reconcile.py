"""Reconciliation: the controller's books checked against what the tiers really hold.

The books follow committed moves; a tier can lose what they point at without a move (Redis
restarted empty, a DRAM tier lost), and a copy can outlive the books' last word on it (a
drop refused during a Redis stall, an undo that could not reach Redis). Neither heals on
its own: the tiers never drop on their own (the planner is the only policy).

Who calls: the controller actor runs ``Reconciler.run``: a pass every ``interval_s``, and at
once when its probe (one agent's Health, every ``PROBE_S``) finds the shared tier restarted
(Redis's ``run_id`` changed) or back after an outage. A pass:

1. notes where the books place each off-GPU session (DRAM, shared), and watches which
   sessions move from then on (``LiveController.moving``);
2. reads every node agent's occupancy report (streamed; while Redis answers, each also
   lists the shared tier's sessions);
3. under the planning lock (no move in flight), books as recomputed (``MoveReason.LOST``)
   each session whose copy is absent where the books and a report that would show it agree
   it should be, and that did not move since step 1: its next call runs at once;
4. drops the orphans, one at a time, each under the planning lock and checked again just
   before: a shared copy of a session the books place elsewhere or not at all, a node copy
   of a session the books do not know, and an engine's hold on (or a write-through copy of)
   a session the books place in another tier or nowhere: a release line the agent could not
   write, or a restarted controller, left the engine holding blocks nobody would free, and
   the books' GPU tier then promises blocks the engine lacks (its calls stall inside vLLM).
   Such a drop releases the hold only: it never touches a copy booked in a tier of its own.

Never judged: GPU-tier sessions the books place there, a node whose agent sent no report, the shared tier when no report could read it, copies
pinned by a prepared move, sessions whose failed release the tick retries. Cost: O(sessions)
per pass, in the background, off the calls' path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from controller.policy import Location, Tier
from controller.policy.types import SHARED

if TYPE_CHECKING:
    from controller.runtime.live import LiveController

log = logging.getLogger(__name__)
PROBE_S = 1.0  # how often one agent is asked whether the shared tier restarted
CHECKED = (Tier.DRAM, Tier.SHARED)  # tiers whose booked copies a pass checks


class Reporter(Protocol):
    """What a pass asks of the node agents (``GrpcMover``)."""

    addresses: dict[str, str]

    async def report(self, node_id: str): ...

    async def health(self, node_id: str | None = None): ...


@dataclass
class Held:
    """What the reports say the tiers hold."""

    copies: dict[str, set[Location]] = field(default_factory=dict)  # session -> where a copy is
    pinned: set[str] = field(default_factory=set)  # sessions with a copy pinned by a prepared move
    nodes: set[str] = field(default_factory=set)  # nodes whose agent reported
    shared_read: bool = False  # some report read the shared tier


@dataclass(frozen=True)
class Reconciled:
    lost: list[str]  # sessions booked as recomputed
    orphans: list[tuple[str, Location]]  # copies dropped
    seconds: float


def held_in(reports) -> Held:
    held = Held()
    for report in reports:
        held.nodes.add(report.node_id)
        held.shared_read |= any(t.where.tier == Tier.SHARED.pb for t in report.tiers)
        for kv in report.sessions:
            tier = Tier.from_pb(kv.location.tier)
            where = Location(tier, kv.location.replica_id) if tier.per_replica else Location(tier)
            held.copies.setdefault(kv.session_id, set()).add(where)
            if kv.pinned_by_move_id:
                held.pinned.add(kv.session_id)
    return held


def is_orphan(live: LiveController, session_id: str, where: Location) -> bool:
    """A copy in ``where`` that no session of the books owns (see the module docstring)."""
    if session_id in live.unreleased or (live.moving and session_id in live.moving):
        return False
    record = live.state.sessions.get(session_id)
    if where.tier is Tier.SHARED:
        return record is None or record.location != SHARED
    if where.tier is Tier.GPU and record is not None:  # the engine holds KV the books place elsewhere
        return record.location != where and where.replica in live.nodes
    return record is None and where.replica in live.nodes


class Reconciler:
    def __init__(self, live: Callable[[], LiveController], agents: Reporter) -> None:
        """``live``: the controller's books now (``set_policy`` swaps them)."""
        self.live, self.agents = live, agents
        self._instance: str | None = None  # the shared tier's last instance seen
        self._outage = False

    async def run(self, interval_s: float, probe_s: float = PROBE_S) -> None:
        """A pass every ``interval_s`` (0: only after a shared-tier restart), until cancelled."""
        waited = 0.0
        while True:
            await asyncio.sleep(probe_s)
            waited += probe_s
            try:
                if await self.shared_restarted() or (interval_s and waited >= interval_s):
                    waited = 0.0
                    await self.reconcile()
            except Exception:  # a failed pass must not stop the loop
                log.exception("reconciliation failed")

    async def shared_restarted(self) -> bool:
        """True once the shared tier answers as another instance, or again after an outage."""
        try:
            instance = (await self.agents.health()).shared_tier_instance_id
        except Exception as error:
            log.debug("reconciliation probe failed: %s", type(error).__name__)
            return False
        if not instance:
            self._outage = True
            return False
        changed = (self._instance is not None and instance != self._instance) or self._outage
        self._instance, self._outage = instance, False
        if changed:
            log.warning("the shared tier restarted or came back (instance %s): reconciling now", instance[:8])
        return changed

    async def reconcile(self) -> Reconciled:
        live, started = self.live(), time.perf_counter()
        if not live.policy.moves_kv:  # the engine's cache holds the KV: the books place none
            return Reconciled([], [], 0.0)
        booked = {s: where for where, members in live.state.residents.items() if where.tier in CHECKED
                  for s in members}
        live.moving = set()
        try:
            held = held_in(await self._reports())
            async with live._lock:
                lost = [s for s, where in booked.items() if self._absent(live, held, s, where)
                        and live.book_lost(s, where)]
            orphans = await self._drop_orphans(live, held)
        finally:
            live.moving = None
        done = Reconciled(lost, orphans, time.perf_counter() - started)
        if lost or orphans:
            log.warning("reconciled in %.3f s: %d session(s) whose copy was gone now recomputed, %d orphan "
                        "copies dropped", done.seconds, len(lost), len(orphans))
        return done

    async def _reports(self) -> list:
        async def one(node_id: str):
            try:
                return await self.agents.report(node_id)
            except Exception as error:
                log.warning("node %s sent no occupancy report to reconcile: %s", node_id, type(error).__name__)
                return None

        reports = await asyncio.gather(*map(one, sorted(self.agents.addresses)))
        return [r for r in reports if r is not None]

    @staticmethod
    def _absent(live: LiveController, held: Held, session_id: str, where: Location) -> bool:
        if session_id in live.moving or session_id in held.pinned:
            return False
        if where.tier is Tier.SHARED:
            seen = held.shared_read
        else:
            seen = live.nodes.get(where.replica) in held.nodes
        return seen and where not in held.copies.get(session_id, ())

    async def _drop_orphans(self, live: LiveController, held: Held) -> list[tuple[str, Location]]:
        dropped = []
        for session_id, places in held.copies.items():
            if session_id in held.pinned:
                continue
            for where in places:
                if not is_orphan(live, session_id, where):
                    continue
                async with live._lock:  # no move in flight; the books may have changed since
                    if is_orphan(live, session_id, where) and await live.release_copy(session_id, where):
                        dropped.append((session_id, where))
        return dropped
