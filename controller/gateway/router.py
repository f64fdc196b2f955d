"""`LullRouter`: a Ray Serve request router that sends a call to the replica the controller chose.

The gateway calls the engine deployment through a handle whose `session_id`
option carries the target replica's unique id (the controller's placement, which
is also the replica's KV connector id): `handle.options(session_id=replica_id)`.

If that replica is gone (died, scaled down), Serve must still send the call somewhere,
so it goes to any replica, which refuses it (`proto.engine_call.MisroutedCall`): the
call's KV cache was booked on the replica that left, and run elsewhere it would take
blocks the controller booked for other sessions. The gateway then reports the replica
lost and admits the call again; whether Serve has dropped the replica (`departed`)
tells the controller it is dead, not merely slow. A target that is alive but busy is
waited for, never bypassed: going elsewhere would recompute a context whose KV sits on
the target.

A target this router has never seen is most likely a replica that registered with
the controller (at the end of its constructor) before Serve's replica broadcast
reached this process: the call waits for it, up to `NEW_REPLICA_WAIT_S`, and only
then goes anywhere. Membership itself is the controller's (`controller.runtime.membership`);
the router keeps no directory for anyone else to read.
"""

from __future__ import annotations

import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = "controller.gateway.router.LullRouter"
NEW_REPLICA_WAIT_S = 5.0  # Serve broadcasts a new replica within a second or two
_DEPARTED: set[str] = set()  # replicas Serve broadcast to a router of this process, then dropped


def departed(replica_id: str) -> bool:
    """Serve dropped this replica from the engine deployment (it died or is stopping)."""
    return replica_id in _DEPARTED


class LullRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self.seen: set[str] = set()  # every replica id Serve has broadcast to this router

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        current = {r.replica_id.unique_id for r in replicas}
        _DEPARTED.update(self.seen - current)
        _DEPARTED.difference_update(current)
        self.seen.update(current)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        target = ""
        if pending_request is not None:
            target = pending_request.metadata.session_id
            # Back off between attempts when every choice is busy; without this Serve retries at once.
            pending_request.routing_context.should_backoff = True
        if target:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if chosen:
                return [chosen]
            if target in self.seen:  # dropped: by a broadcast, or by Serve on an ActorDiedError
                _DEPARTED.add(target)
            if target not in self.seen and time.time() - pending_request.created_at < NEW_REPLICA_WAIT_S:
                return []  # not broadcast here yet: Serve asks again after a backoff
        # No target, or it is gone: Serve picks the least loaded of all (a gated call's replica refuses it).
        return [list(candidate_replicas)]
