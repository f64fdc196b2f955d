"""`LullRouter`: a Ray Serve request router that sends a call to the replica the controller chose.

The gateway calls the engine deployment through a handle whose `session_id`
option carries the target replica's unique id (the controller's placement, which
is also the replica's KV connector id): `handle.options(session_id=replica_id)`.
The engine's request dict stays exactly what `LullEngine` accepts.

If that replica is gone (restarted, scaled down), the call goes to any replica:
the KV is lost with the replica, so every replica is as good as another, and
the controller learns of the new placement from the replica id in the reply.
A target that is alive but busy is waited for, never bypassed: going elsewhere
would recompute a context whose KV sits on the target.

The router also records every running replica and its Ray node in
`REPLICAS` (this process only), which the gateway reads to register replicas
with the controller. It is fed by Serve's own replica broadcast, so no second
discovery mechanism can disagree with where requests are actually routed.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = "controller.gateway.router.LullRouter"

# replica unique_id -> Ray node id, as last broadcast by Serve to a LullRouter in this process.
REPLICAS: dict[str, str] = {}


def known_replicas() -> dict[str, str]:
    """This process's replica directory (callers pickled by value must not read a copy of it)."""
    from controller.gateway import router

    return dict(router.REPLICAS)


class LullRouter(RequestRouter):
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        # Serve ships the router class pickled by value, so this class's globals are a
        # copy: import the module to reach the directory the gateway reads.
        from controller.gateway import router

        current = {r.replica_id.unique_id: r.node_id or "" for r in replicas}
        for gone in set(router.REPLICAS) - set(current):
            del router.REPLICAS[gone]
        router.REPLICAS.update(current)

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
        # No target, or it is gone: Serve picks the least loaded of all.
        return [list(candidate_replicas)]
