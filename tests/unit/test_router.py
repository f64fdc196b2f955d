"""`LullRouter` sends a call to the replica the controller placed its session on: it waits a
moment for a replica Serve has not broadcast to it yet (it registered with the controller
first), and goes anywhere for one that is gone."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from controller.gateway.router import NEW_REPLICA_WAIT_S, LullRouter


def replica(unique_id: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def pending(target: str, age_s: float = 0.0):
    return SimpleNamespace(metadata=SimpleNamespace(session_id=target), created_at=time.time() - age_s,
                           routing_context=SimpleNamespace(should_backoff=False))


def choose(router, candidates, request):
    return asyncio.run(router.choose_replicas(candidates, request))


def test_targets_known_new_and_gone():
    router = LullRouter.__new__(LullRouter)  # Serve builds it with its own arguments; the state is ours
    router.initialize_state()
    a, b = replica("a"), replica("b")
    router.seen.update({"a", "b", "gone"})
    assert choose(router, [a, b], pending("b")) == [[b]]
    assert choose(router, [a, b], pending("gone")) == [[a, b]]  # its KV went with it: any replica
    assert choose(router, [a, b], pending("new")) == []  # registered, not broadcast here yet: wait
    assert choose(router, [a, b], pending("new", age_s=NEW_REPLICA_WAIT_S + 1)) == [[a, b]]
    assert choose(router, [a, b], pending("")) == [[a, b]]
