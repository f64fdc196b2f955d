"""`LullEngine`: the Ray Serve deployment of an engine replica (one per GPU; here one per CPU slot).

A thin shell over `EngineReplica`. Each Serve replica names its KV connector
after its own Serve replica id, so the node agent can release one replica's
GPU-tier sessions without touching another's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import ray
from ray import serve

from proto.names import CONTROLLER_ACTOR, ENGINE_DEPLOYMENT, RAY_NAMESPACE
from workers.dram_store import node_dram_dir
from workers.engine import EngineReplica, EngineSettings, StreamEnd


log = logging.getLogger(__name__)
DRAIN_WAIT_S = 70.0  # the controller's drain deadline (60 s), plus its last moves


@serve.deployment(name=ENGINE_DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  graceful_shutdown_timeout_s=DRAIN_WAIT_S + 10)
class LullEngine:
    def __init__(self, settings: dict):
        from proto.telemetry.metrics import ensure_metrics_dir

        ensure_metrics_dir()  # vLLM's metrics go to the node's multiprocess directory: make sure it exists
        replica_id = serve.get_replica_context().replica_id.unique_id
        # One DRAM tier per Ray node, even when several Ray nodes share a host (`lull up --nodes N`).
        dram_dir = node_dram_dir(settings["dram_dir"], ray.get_runtime_context().get_node_id())
        self.replica = EngineReplica(EngineSettings(**{**settings, "replica_id": replica_id, "dram_dir": dram_dir}))

    def replica_id(self) -> str:
        return self.replica.settings.replica_id

    async def generate(self, request: dict) -> dict:
        """One call: `prompt_token_ids`, optional `session_id`, `tenant`, `tier`, `max_tokens`, `temperature`."""
        done = await self.replica.complete(**_call_args(request))
        return dataclasses.asdict(done) | {"replica_id": self.replica_id()}

    async def stream(self, request: dict):
        """The same call, streamed: yields lists of new token ids (use handle.options(stream=True)),
        then a `StreamEnd` (no ids) with the prompt tokens whose KV was reused."""
        async for ids, done in self.replica.stream(**_call_args(request)):
            if ids:
                yield ids
            if done is not None:
                yield StreamEnd(done.cached_tokens)

    def metrics_text(self) -> str:
        """vLLM's own `vllm:*` metrics of this replica, in Prometheus text format."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    async def reset_prefix_cache(self) -> bool:
        return await self.replica.reset_prefix_cache()

    async def __del__(self):
        """Serve stops this replica (scaled down, redeployed) once its calls are done: first
        the controller drains its sessions' KV from this node's DRAM tier to the shared
        tier (``controller.runtime.drain``). Waiting here keeps the replica, and so its Ray
        node, alive until then: Ray's autoscaler removes only idle nodes."""
        replica_id = self.replica_id()
        try:
            controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
            report = await asyncio.wait_for(controller.drain_replica.remote(replica_id), DRAIN_WAIT_S)
            log.info("replica %s drained before shutdown: %s", replica_id, report)
        except Exception as error:  # no controller (engine-only app), or it is gone: nothing to drain into
            log.warning("replica %s stops without a drain (%s: %s)", replica_id, type(error).__name__, error)
        try:
            self.replica.shutdown()
        except Exception as error:  # the process ends anyway; its engine core goes with it
            log.warning("engine of replica %s did not shut down cleanly: %s", replica_id, error)


def _call_args(request: dict) -> dict:
    allowed = {"prompt_token_ids", "session_id", "tenant", "tier", "max_tokens", "temperature", "request_id",
               "trace_headers"}
    unknown = set(request) - allowed
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    ids = request.get("prompt_token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise ValueError("prompt_token_ids must be a list of non-negative integers")
    headers = request.get("trace_headers")
    if headers is not None and not (isinstance(headers, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                      for k, v in headers.items())):
        raise ValueError("trace_headers must map header names to strings")
    return request


def engine_app(settings: EngineSettings, num_replicas: int = 1):
    """The Serve application of `num_replicas` engine replicas with these settings."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return LullEngine.options(num_replicas=num_replicas).bind(values)
