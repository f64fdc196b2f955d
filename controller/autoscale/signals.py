"""The controller's scaling signals, published for Serve's autoscaler to read.

Serve runs the engine deployment's autoscaling policy (``serve_policy``) in its own
controller process, inside its control loop, which must not wait on Lull's controller
actor. So the Lull controller publishes what the policy needs (each replica's GPU
tier, the gate waits, the waiting set, the replicas draining) once a second to Ray's
GCS key-value store, and the policy reads the latest copy with one local GCS call.
A copy older than ``STALE_S`` is not acted on: the policy holds the count.
"""

from __future__ import annotations

import json
import time

from proto.names import RAY_NAMESPACE
from controller.policy import Location, Phase, Tier

KEY = b"scaling-signals"
DECISION_KEY = b"scaling-decision"  # the policy's latest count and why, for the gateway's gauge and status
PERIOD_S = 1.0
STALE_S = 15.0


def collect(live, now_wall: float | None = None) -> dict:
    """The signals of a ``LiveController``, as plain JSON-able data."""
    replicas = []
    for replica_id in sorted(live.nodes):
        if replica_id in live.draining:
            continue  # leaving: neither capacity nor load the policy may count on
        gpu = Location(Tier.GPU, replica_id)
        replicas.append(dict(name=replica_id, gpu_used_tokens=live.state.used.get(gpu, 0),
                             gpu_capacity_tokens=live.capacity[gpu]))
    waiting = sum(1 for r in live.state.sessions.values()
                  if r.phase is Phase.GATED and r.location.tier is Tier.WAITING)
    return dict(published_at=time.time() if now_wall is None else now_wall, policy=live.policy_name,
                replicas=replicas, draining=len(live.draining), gate_waits_s=[round(w, 3) for w in live.gate_waits()],
                waiting_sessions=waiting)


def publish(signals: dict, key: bytes = KEY) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, json.dumps(signals).encode(), overwrite=True, namespace=RAY_NAMESPACE)


def read(key: bytes = KEY) -> dict | None:
    """The latest published signals (or decision), or None when there are none."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(key, namespace=RAY_NAMESPACE)
    return json.loads(raw) if raw else None


def fresh(signals: dict | None, now_wall: float) -> bool:
    return signals is not None and abs(now_wall - signals.get("published_at", float("-inf"))) <= STALE_S
