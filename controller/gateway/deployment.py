"""`LullGateway`: the Serve ingress (REST on the HTTP port, the gRPC session service) over
the `LullEngine` replicas and the controller actor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import ray
from ray import serve

from controller.assembly.launch import alive_nodes, node_agent_address
from controller.assembly.settings import kv_bytes_per_token
from controller.autoscale import signals as scaling_signals
from controller.gateway.grpc_service import start_grpc
from controller.gateway.metrics import MeteredController, MeteredEngines, count_rest_requests
from controller.gateway.protocol import Authenticator
from controller.gateway.rest import create_app
from controller.gateway.router import known_replicas
from controller.gateway.service import ControllerClient, GatewayCore, Limits
from proto.config import GIB, LullConfig
from proto.names import CONTROLLER_ACTOR, GATEWAY_DEPLOYMENT, RAY_NAMESPACE
from proto.telemetry.metrics import make_metrics
from proto.telemetry.tracing import setup_tracing

log = logging.getLogger(__name__)
REPLICA_SYNC_S = 1.0


class ServeEngines:
    """The engine deployment's handle, addressed by replica id through `LullRouter`."""

    def __init__(self, handle):
        self.handle = handle

    async def generate(self, replica_id: str, request: dict) -> dict:
        done = await self.handle.options(session_id=replica_id).generate.remote(request)
        if done["replica_id"] != replica_id:
            log.warning("replica %s is gone; session %s ran on %s", replica_id, request["session_id"],
                        done["replica_id"])
        return done

    async def stream(self, replica_id: str, request: dict) -> AsyncIterator[list[int]]:
        async for ids in self.handle.options(session_id=replica_id, stream=True).stream.remote(request):
            yield ids


@serve.deployment(name=GATEWAY_DEPLOYMENT, max_ongoing_requests=1000)
@serve.ingress()
class LullGateway:
    async def __init__(self, engine_handle, config: LullConfig, engine: dict):
        self.config = config  # build_app's, overrides included (its secrets are read again here)
        setup_tracing("lull-gateway")  # exports only when the OTEL_* variables ask for it
        self.controller = ControllerClient(ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE))
        self.engines = ServeEngines(engine_handle)
        self.metrics = make_metrics()  # the process's registry: the node's multiprocess directory
        self.metrics["lull:replicas_target"].set(config.replicas.initial)  # then the autoscaler's, once it decides
        arrivals: dict = {}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(engine["model"])
        per_token = kv_bytes_per_token(engine["model"], engine["dtype"])
        physical = int(engine["cpu_kv_cache_gib"] * GIB) // per_token
        # A budget below the engine's cache makes tiering visible on a small machine: the
        # controller admits and demotes within it while vLLM keeps its whole cache.
        gpu_tokens = min(physical, config.tiers.gpu_tier_tokens or physical)
        self.capacity = (gpu_tokens, engine["dram_capacity_bytes"] // per_token)
        limits = Limits(max_model_len=engine["max_model_len"], max_prompt_tokens=self.config.max_prompt_tokens,
                        default_max_tokens=config.gateway.default_max_tokens,
                        gate_timeout_s=self.config.gateway.gate_timeout_s)
        self.core = GatewayCore(MeteredController(self.controller, arrivals),
                                MeteredEngines(self.engines, self.metrics, arrivals), tokenizer, limits)
        self.model_name = engine["served_model_name"]
        self.registered: dict[str, str] = {}  # replica -> its Ray node
        self._agent_nodes: set[str] = set()  # nodes whose KV agent the controller knows
        self._drains: set[asyncio.Task] = set()
        grpc_port = config.gateway.grpc_port
        self.grpc_server = None
        if grpc_port:
            auth = Authenticator(self.config.secrets, self.config.auth.required)
            self.grpc_server = await start_grpc(self.core, auth, grpc_port)
        await engine_handle.replica_id.remote()  # starts the handle's router, so the replica directory fills in
        await self.sync_replicas()
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    def __serve_build_asgi_app__(self):
        auth = Authenticator(self.config.secrets, self.config.auth.required)
        app = create_app(self.core, auth, self.model_name)
        count_rest_requests(app, self.metrics)

        @app.middleware("http")
        async def _sync_first(request, call_next):  # a replica that just came up is known before a call
            if known_replicas().keys() - self.registered:
                await self.sync_replicas()
            return await call_next(request)

        return app

    async def sync_replicas(self) -> None:
        """Register with the controller every engine replica the router knows and it does not
        (starting a KV agent on its node first, for a node that joined since launch); drain
        those Serve no longer runs (scaled down, stopped, died), so no session is placed there."""
        known = known_replicas()
        self._agent_nodes = set(await self.controller.agent_nodes())  # a restarted controller starts over
        for replica_id, node_id in known.items():
            await self._ensure_agent(node_id)
            if replica_id not in self.registered:
                await self.controller.add_replica(replica_id, node_id, *self.capacity)
                self.registered[replica_id] = node_id
                log.info("registered engine replica %s on node %s", replica_id, node_id)
        for gone in set(self.registered) - set(known) if known else ():  # empty: no broadcast yet
            node_id = self.registered.pop(gone)
            self._drains.add(asyncio.get_running_loop().create_task(self._drain(gone, node_id)))

    async def _ensure_agent(self, node_id: str) -> None:
        if node_id in self._agent_nodes or not node_id:
            return
        address = await asyncio.to_thread(node_agent_address, self.config, node_id)
        await self.controller.set_agent(node_id, address)
        self._agent_nodes.add(node_id)
        log.info("started the KV agent of new node %s at %s", node_id, address)

    async def _drain(self, replica_id: str, node_id: str) -> None:
        """Serve no longer routes to the replica. If its node lives, the controller drains its
        sessions' KV from that node's DRAM to the shared tier, then forgets it; if the node
        is gone, so is that KV: the replica is removed at once and the node's agent forgotten."""
        try:
            if node_id and node_id not in await asyncio.to_thread(alive_nodes):
                log.warning("engine replica %s left with its node %s; its sessions' local KV is lost",
                            replica_id, node_id)
                await self.controller.forget_agent(node_id)
                self._agent_nodes.discard(node_id)
                await self.controller.remove_replica(replica_id)
            else:
                log.warning("engine replica %s left Serve; draining its sessions", replica_id)
                await self.controller.drain_replica(replica_id)
        except Exception as error:  # the core removed it first, after a call failed there
            log.info("replica %s not drained (%s)", replica_id, type(error).__name__)
        finally:
            self._drains.discard(asyncio.current_task())

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(REPLICA_SYNC_S)
            try:
                await self.sync_replicas()
                if decision := scaling_signals.read(scaling_signals.DECISION_KEY):
                    self.metrics["lull:replicas_target"].set(decision["target"])
            except Exception:
                log.exception("replica sync failed")
