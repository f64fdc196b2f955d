"""Ray's side of replica membership (``runtime.membership``): the cluster's alive nodes and
named actors, the start of a node agent, and a store in Ray's GCS key-value table that
outlives the controller actor.

The controller never imports the workers (layers): the assembly hands it ``start_agent``,
a picklable callable that starts (or finds) a node's agent actor and returns its handle.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import ray

from proto.names import RAY_NAMESPACE

AGENT_START_S = 120.0  # an agent's first start loads its DRAM tier and binds its port
MEMBERSHIP_KEY = b"membership"


class RayCluster:
    """The `Cluster` of ``runtime.membership`` on the running Ray cluster. Ray's control-store
    calls block, so each runs in a thread, off the controller's event loop."""

    def __init__(self, start_agent: Callable[[str], Any] | None = None) -> None:
        self._start_agent = start_agent

    async def alive_nodes(self) -> set[str]:
        nodes = await asyncio.to_thread(ray.nodes)
        return {node["NodeID"] for node in nodes if node["Alive"]}

    async def alive_actors(self) -> set[str]:
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        return {actor["name"] for actor in named}

    async def start_agent(self, node_id: str) -> str:
        if self._start_agent is None:
            raise RuntimeError(f"node {node_id} has no KV agent and the controller was launched without "
                               f"start_agent; launch it with controller.assembly.launch.ensure_controller")
        handle = await asyncio.to_thread(self._start_agent, node_id)
        return await asyncio.wait_for(handle.address.remote(), AGENT_START_S)


class GcsStore:
    """A membership `Store` in the GCS key-value table (namespace ``RAY_NAMESPACE``): it lives
    as long as the Ray cluster, so a restarted or relaunched controller reads it back."""

    def __init__(self, key: bytes = MEMBERSHIP_KEY) -> None:
        self.key = key

    def load(self) -> dict | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self.key, namespace=RAY_NAMESPACE)
        return json.loads(raw) if raw else None

    def save(self, data: dict) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, json.dumps(data).encode(), overwrite=True, namespace=RAY_NAMESPACE)
