"""Where sessions' KV is, read from the node agents' OccupancyReports: how a restarted
controller rebuilds its books.

Rules, each for a reason:
- A session in a node's report as GPU (DRAM label ``gpu``) or DRAM (``dram``) is
  there on that replica; a copy pinned by a prepared move is reported at its source,
  which owns the KV until the move commits.
- Every agent lists the shared tier's sessions; a node-local copy wins over the
  shared one (it is the nearer tier), and the fastest tier wins between nodes.
- Shared entries carry bytes, not tokens: with ``bytes_per_token`` unknown they are
  left out (the session comes back on its next request, as new; its shared copy stays
  unbooked, as the shared tier never drops on its own): never an over-full book.
- A replica the controller does not know (gone, or not added yet) keeps nothing:
  its sessions come back as waiting.
- Reports of an older agent instance than a newer one from the same node are stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from controller.policy import Location, Tier

log = logging.getLogger(__name__)

RESTORABLE = {Tier.GPU.pb: Tier.GPU, Tier.DRAM.pb: Tier.DRAM, Tier.SHARED.pb: Tier.SHARED}  # WAITING holds no KV


@dataclass(frozen=True)
class Placement:
    session_id: str
    where: Location
    tokens: int


def placements_from_reports(reports: Iterable, replicas: set[str],
                            bytes_per_token: int | None = None) -> list[Placement]:
    newest: dict[str, object] = {}
    for report in reports:
        old = newest.get(report.node_id)
        if old is None or (old.agent_instance_id == report.agent_instance_id and report.report_seq > old.report_seq):
            newest[report.node_id] = report
    best: dict[str, Placement] = {}
    for node_id in sorted(newest):
        for kv in newest[node_id].sessions:
            place = _placement(kv, replicas, bytes_per_token)
            if place is None:
                continue
            known = best.get(kv.session_id)
            if known is None or place.where.tier < known.where.tier:
                best[kv.session_id] = place
    return sorted(best.values(), key=lambda p: p.session_id)


def _placement(kv, replicas: set[str], bytes_per_token: int | None) -> Placement | None:
    tier = RESTORABLE.get(kv.location.tier)
    tokens = kv.kv_tokens
    if tier is Tier.SHARED and not tokens and bytes_per_token:
        tokens = -(-kv.kv_bytes // bytes_per_token)
    if tier is None or tokens < 1:
        return None
    if tier.per_replica:
        if kv.location.replica_id not in replicas:
            return Placement(kv.session_id, Location(Tier.WAITING), tokens)
        return Placement(kv.session_id, Location(tier, kv.location.replica_id), tokens)
    return Placement(kv.session_id, Location(tier), tokens)


async def reports_for_restart(agents, timeout_s: float) -> list:
    """Every node agent's occupancy report (streamed: any number of sessions), each agent's
    half-done moves aborted first-hand: the controller that prepared them is gone, and
    aborting them now releases their pins instead of waiting out their leases. A node whose
    agent does not answer its Health within ``timeout_s`` is left out (its sessions come back
    as new); one that does streams its report within the mover's own call timeout, however
    many sessions it holds (50,000 took about a second here). All agents are asked at once,
    so one vanished host delays the restart by ``timeout_s``, not by a timeout per node.
    ``agents``: the ``GrpcMover`` (``addresses``, ``health``, ``report``, ``abort``)."""

    async def one(node_id: str):
        try:
            await asyncio.wait_for(agents.health(node_id), timeout_s)
            report = await agents.report(node_id)
            await agents.abort(node_id, list(report.prepared_move_ids), "controller restarted")
            return report
        except Exception as e:
            log.warning("node %s sent no occupancy report: %s", node_id, e or type(e).__name__)
            return None

    reports = await asyncio.gather(*map(one, sorted(agents.addresses)))
    return [r for r in reports if r is not None]
