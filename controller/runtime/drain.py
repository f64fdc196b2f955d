"""Draining an engine replica before it goes: its sessions' KV leaves for the shared tier.

A replica that Serve scales down, or that stops for any reason while its node lives,
still has every session's KV in the node's DRAM tier: a GPU-tier session was written
through there when its call finished. Draining books the replica's GPU and DRAM tiers
at zero capacity, so the planner's own overflow rule demotes every resident (most idle
first, down to the shared tier, making room there by the global ranking) and never
places a session there again. Calls running on the replica are waited for; their
sessions demote once they finish. The replica is removed when it holds nothing, when
a planning step moves nothing more (its node is gone, or the shared tier refuses), or
at the deadline; what is still on it then is lost, and recomputed on its next call.

Sessions then resume on any replica: a promotion from the shared tier copies the KV
into the chosen node's DRAM, where its engine loads it instead of recomputing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from controller.policy import Location, Phase, ReplicaSpec, Tier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainReport:
    replica_id: str
    seconds: float  # wall time from the drain's start to the replica's removal
    sessions: int  # sessions whose KV was on the replica (or whose call ran there) at the start
    saved_sessions: int  # ... whose KV left for another tier: they resume without recompute
    saved_tokens: int  # their KV tokens: the recompute the drain avoided
    lost_sessions: int  # ... whose KV was dropped: recomputed on their next call
    lost_tokens: int
    timed_out: bool


async def drain_replica(live, replica_id: str, *, timeout_s: float, poll_s: float = 0.05) -> DrainReport:
    """Drain ``replica_id`` of the ``LiveController`` ``live``, then remove it from its books."""
    return await start_drain(live, replica_id, timeout_s=timeout_s, poll_s=poll_s)


def start_drain(live, replica_id: str, *, timeout_s: float, poll_s: float = 0.05) -> asyncio.Task:
    """Book the replica at zero capacity now, so that no session is placed there from this
    call on (a retried call must not go back to a replica that died under it), and drain
    it in a task of the running loop, which returns the ``DrainReport``."""
    if replica_id not in live.state.replicas:
        raise ValueError(f"unknown replica {replica_id!r}")
    if not 0 < timeout_s <= 3600:
        raise ValueError(f"timeout_s must be in (0, 3600], got {timeout_s}")
    started = time.monotonic()
    on_it = _residents(live, replica_id)
    live.draining.add(replica_id)
    live.state.set_replica(ReplicaSpec(replica_id, 0, 0))
    task = asyncio.get_running_loop().create_task(_finish(live, replica_id, on_it, started, timeout_s, poll_s))
    task.add_done_callback(lambda _: live.draining.discard(replica_id))  # also when cancelled before it ran
    return task


async def _finish(live, replica_id: str, on_it: set[str], started: float, timeout_s: float,
                  poll_s: float) -> DrainReport:
    try:
        timed_out = await _demote_all(live, replica_id, started + timeout_s, poll_s)
        if replica_id in live.state.replicas:  # a dead node may have had it removed meanwhile
            live.remove_replica(replica_id)
    finally:
        live.draining.discard(replica_id)
    saved, lost = _outcome(live, on_it)
    report = DrainReport(replica_id, round(time.monotonic() - started, 3), len(saved) + len(lost), len(saved),
                         sum(saved.values()), len(lost), sum(lost.values()), timed_out)
    log.info("drained replica %s in %.2f s: %d session(s), %d kept (%d tokens), %d lost (%d tokens)%s",
             replica_id, report.seconds, report.sessions, report.saved_sessions, report.saved_tokens,
             report.lost_sessions, report.lost_tokens, " (timed out)" if timed_out else "")
    return report


async def _demote_all(live, replica_id: str, deadline: float, poll_s: float, patience: int = 3) -> bool:
    """Plan until the replica holds nothing; True if the deadline passed first."""
    stalled = 0
    while replica_id in live.state.replicas:
        before = _residents(live, replica_id)
        if not before:
            return False
        if time.monotonic() >= deadline:
            return True
        await live.plan_step()
        after = _residents(live, replica_id)
        running = any(live.state.sessions[s].phase is Phase.LLM for s in after)
        stalled = stalled + 1 if after and after >= before and not running else 0
        if stalled >= patience:
            log.warning("drain of %s stalled with %d session(s) left (moves refused or node gone)",
                        replica_id, len(after))
            return False
        if after:
            await asyncio.sleep(poll_s)
    return False


def _residents(live, replica_id: str) -> set[str]:
    members: set[str] = set()
    for tier in (Tier.GPU, Tier.DRAM):
        members |= live.state.residents.get(Location(tier, replica_id), set())
    return members


def _outcome(live, sessions: set[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Of ``sessions``: those whose KV is kept elsewhere and those whose KV is gone, with
    their tokens. Sessions closed meanwhile, or with no KV yet, count in neither."""
    saved, lost = {}, {}
    for session_id in sessions:
        record = live.state.sessions.get(session_id)
        if record is None or record.context_tokens == 0:
            continue
        kept = record.location.tier is not Tier.WAITING
        (saved if kept else lost)[session_id] = record.context_tokens
    return saved, lost
