"""`LullEngine`: the Ray Serve deployment of an engine replica (one per GPU; here one per CPU slot).

A thin shell over `EngineReplica`. Each Serve replica names its KV connector
after its own Serve replica id, so the node agent can release one replica's
GPU-tier sessions without touching another's.

Membership: a replica given its `capacity` registers itself with the controller
actor once its engine is up (its replica id, Ray node, actor name and the KV tokens
the controller may book on it), and deregisters on its way out, which drains its
sessions' KV first. Without `capacity` (an engine-only app) it talks to no controller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import ray
from ray import serve

from proto.actor_errors import controller_gone
from proto.engine_call import EngineCall, MisroutedCall
from proto.engine_request import EngineRequest
from proto.names import CONTROLLER_ACTOR, ENGINE_DEPLOYMENT, RAY_NAMESPACE
from workers.dram_store import node_dram_dir
from workers.engine import EngineReplica, EngineSettings, StreamEnd


log = logging.getLogger(__name__)
DRAIN_WAIT_S = 70.0  # the controller's drain deadline (60 s), plus its last moves
REGISTER_WAIT_S = 60.0  # how long a starting replica waits for a restarting controller


@serve.deployment(name=ENGINE_DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  graceful_shutdown_timeout_s=DRAIN_WAIT_S + 10)
class LullEngine:
    async def __init__(self, settings: dict, capacity: dict | None = None):
        """``capacity``: ``{"gpu_tokens": n, "dram_tokens": m}``, the KV tokens the controller
        books on this replica; None: serve without a controller."""
        from proto.telemetry.metrics import ensure_metrics_dir

        self.registered = False
        ensure_metrics_dir()  # vLLM's metrics go to the node's multiprocess directory: make sure it exists
        if capacity is not None and set(capacity) != {"gpu_tokens", "dram_tokens"}:
            raise ValueError(f"capacity needs exactly gpu_tokens and dram_tokens, got {sorted(capacity)}")
        replica_id = serve.get_replica_context().replica_id.unique_id
        node_id = ray.get_runtime_context().get_node_id()
        # One DRAM tier per Ray node, even when several Ray nodes share a host (`lull up --nodes N`).
        dram_dir = node_dram_dir(settings["dram_dir"], node_id)
        self.replica = EngineReplica(EngineSettings(**{**settings, "replica_id": replica_id, "dram_dir": dram_dir}))
        await self.replica.start()  # vLLM's server is up before the controller sends this replica a call
        if capacity is not None:
            capacity = registered_capacity(capacity, self.replica.kv_cache_tokens(), replica_id)
            await _register(dict(replica_id=replica_id, node_id=node_id,
                                 actor_name=ray.get_runtime_context().get_actor_name(), **capacity))
            self.registered = True

    def replica_id(self) -> str:
        return self.replica.settings.replica_id

    async def generate(self, request: EngineRequest) -> dict:
        """One call; returns the `Completion`'s fields and this replica's id."""
        done = await self.replica.complete(_checked(request))
        return dataclasses.asdict(done) | {"replica_id": self.replica_id()}

    async def stream(self, request: EngineRequest):
        """The same call, streamed: yields lists of new token ids (use handle.options(stream=True)),
        then a `StreamEnd` (no ids) with the prompt tokens whose KV was reused."""
        async for ids, done in self.replica.stream(_checked(request)):
            if ids:
                yield ids
            if done is not None:
                yield StreamEnd(done.cached_tokens)

    async def http(self, call: EngineCall):
        """A client's HTTP request through vLLM's own server (use handle.options(stream=True)):
        yields the response head, its body's chunks, then the call's `CallUsage`."""
        if not isinstance(call, EngineCall):
            raise TypeError(f"an engine call takes a proto.engine_call.EngineCall, got {type(call).__name__}")
        if call.replica_id and call.replica_id != self.replica_id():
            raise MisroutedCall(f"call {call.call_id} was admitted to replica {call.replica_id}, "
                                f"not to this one ({self.replica_id()})")
        async for part in self.replica.http(call):
            yield part

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose vLLM engine core died raises here,
        and Serve replaces it as it does a dead actor (otherwise it answers every call with
        vLLM's EngineDeadError for good)."""
        await self.replica.engine.check_health()

    def metrics_text(self) -> str:
        """vLLM's own `vllm:*` metrics of this replica, in Prometheus text format."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    async def reset_prefix_cache(self) -> bool:
        return await self.replica.reset_prefix_cache()

    async def __del__(self):
        """Serve stops this replica (scaled down, redeployed) once its calls are done: first it
        deregisters, and the controller drains its sessions' KV from this node's DRAM tier to
        the shared tier (``controller.runtime.drain``). Waiting here keeps the replica, and so
        its Ray node, alive until then: Ray's autoscaler removes only idle nodes."""
        replica_id = self.replica_id()
        if self.registered:
            try:
                controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
                report = await asyncio.wait_for(controller.deregister_replica.remote(replica_id), DRAIN_WAIT_S)
                log.info("replica %s drained before shutdown: %s", replica_id, report)
            except Exception as error:  # the controller is gone: nothing to drain into
                log.warning("replica %s stops without a drain (%s: %s)", replica_id, type(error).__name__, error)
        try:
            self.replica.shutdown()
        except Exception as error:  # the process ends anyway; its engine core goes with it
            log.warning("engine of replica %s did not shut down cleanly: %s", replica_id, error)


def registered_capacity(capacity: dict, engine_tokens: int | None, replica_id: str) -> dict:
    """The capacity this replica registers: its GPU tier is the KV cache vLLM really
    allocated (on a GPU, from ``gpu_memory_utilization`` after the weights and activations),
    not the configured estimate, which is kept only when the engine reports none."""
    if engine_tokens is None or engine_tokens == capacity["gpu_tokens"]:
        return capacity
    log.info("replica %s: the engine's KV cache holds %d tokens (configured estimate %d); the GPU tier is the "
             "engine's", replica_id, engine_tokens, capacity["gpu_tokens"])
    return {**capacity, "gpu_tokens": engine_tokens}


async def _register(replica: dict) -> None:
    """Register with the controller actor, waiting (at most ``REGISTER_WAIT_S``) for one that
    is restarting; a controller that never appears is an error: this replica would get no call."""
    deadline = time.monotonic() + REGISTER_WAIT_S
    while True:
        try:
            controller = await asyncio.to_thread(ray.get_actor, CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
        except ValueError as missing:  # killed for good: the gateway relaunches it
            failure: Exception = missing
        else:
            try:
                await controller.register_replica.remote(**replica)
                log.info("replica %s registered with the controller", replica["replica_id"])
                return
            except Exception as error:
                if not controller_gone(error):
                    raise
                failure = error
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {replica['replica_id']} found no controller to register with in "
                               f"{REGISTER_WAIT_S:g} s; start the platform with `lull up` (or pass "
                               f"capacity=None for an engine-only app)") from failure
        log.warning("controller not ready (%s); replica %s retries its registration", type(failure).__name__,
                    replica["replica_id"])
        await asyncio.sleep(0.5)


def _checked(request: EngineRequest) -> EngineRequest:
    if not isinstance(request, EngineRequest):
        raise TypeError(f"an engine call takes a proto.engine_request.EngineRequest, got {type(request).__name__}")
    return request


def engine_app(settings: EngineSettings, num_replicas: int = 1):
    """The Serve application of `num_replicas` engine replicas with these settings."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return LullEngine.options(num_replicas=num_replicas).bind(values)
