"""The controller's own metrics: the GPU tier's gauges (the controller alone accounts HBM
per replica; node agents report DRAM and shared) and a session's state on arrival, which
the gateway records its TTFT by."""

from __future__ import annotations

import asyncio

from proto.tiers import Tier

# The tier label of a session the controller had never seen: its KV is nowhere yet.
NEW_SESSION = "new"


def session_on_arrival(controller, session_id: str) -> tuple[str, int, float | None]:
    """(tier, context tokens, idleness) of a session as a request for it arrives at the
    `LiveController`; (NEW_SESSION, 0, None) for a session it has not seen."""
    record = controller.state.sessions.get(session_id)
    if record is None:
        return NEW_SESSION, 0, None
    return record.location.tier.label, record.context_tokens, record.idleness(controller.clock())


def gauge_sessions(metrics: dict, gated: int, residents: dict) -> None:
    """`lull:gated_requests`, and `lull:sessions` per tier from the books' residents."""
    if "lull:gated_requests" in metrics:
        metrics["lull:gated_requests"].set(gated)
    if "lull:sessions" in metrics:
        counts = dict.fromkeys(Tier, 0)
        for where, members in residents.items():
            counts[where.tier] += len(members)
        for tier, count in counts.items():
            metrics["lull:sessions"].labels(tier=tier.name.lower()).set(count)


async def gauge_gpu_tiers_forever(current_controller, bytes_per_token: int, period_s: float = 1.0) -> None:
    """Keep `lull:tier_used_bytes` / `lull:tier_capacity_bytes` of every replica's GPU tier
    current, from the books of the `LiveController` that ``current_controller()`` returns
    (tokens x bytes per token). The controller alone accounts HBM per replica; node
    agents report DRAM and shared."""
    while True:
        controller = current_controller()
        used_gauge, capacity_gauge = (controller.metrics["lull:tier_used_bytes"],
                                      controller.metrics["lull:tier_capacity_bytes"])
        for where, used in list(controller.state.used.items()):
            if where.tier is not Tier.GPU or where.replica not in controller.nodes:
                continue
            labels = dict(tier=Tier.GPU.label, node=controller.nodes[where.replica], replica=where.replica)
            used_gauge.labels(**labels).set(used * bytes_per_token)
            capacity_gauge.labels(**labels).set(controller.capacity.get(where, 0) * bytes_per_token)
        await asyncio.sleep(period_s)
