"""The Serve application: the `LullGateway` ingress over the `LullEngine` replicas and the controller actor.

`build_app(args)` is Serve's entry point (`controller.app:build_app`). The engine
deployment routes with `LullRouter`, so a call reaches the replica the
controller placed its session on. The controller is a named, detached Ray actor
that outlives gateway restarts; `build_app` starts it, and a KV agent per Ray
node, only when they are absent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from controller.autoscale import signals as scaling_signals
from controller.autoscale.policy import AutoscaleSettings
from controller.autoscale.serve_policy import engine_autoscaling_config
from controller.config import GIB, LullConfig, load_config
from controller.gateway.launch import alive_nodes, ensure_controller, ensure_node_agents, node_agent_address
from controller.gateway.grpc_service import start_grpc
from controller.gateway.protocol import Authenticator
from controller.gateway.rest import create_app
from controller.gateway.router import ROUTER_CLASS, known_replicas
from controller.telemetry.tracing import setup_tracing
from controller.gateway.service import ControllerClient, GatewayCore, Limits
from controller.names import CONTROLLER_ACTOR, GATEWAY_DEPLOYMENT, RAY_NAMESPACE
from controller.telemetry.gateway_metrics import MeteredController, MeteredEngines, count_rest_requests
from controller.telemetry.metrics import make_metrics

log = logging.getLogger(__name__)
REPLICA_SYNC_S = 1.0


@dataclass(frozen=True)
class PlatformSettings:
    """What `build_app` takes beyond `LullConfig` (Serve passes them as the app's args)."""

    replicas: int = 1  # engine replicas at launch
    min_replicas: int | None = None  # the autoscaler's bounds; None: replicas. min < max turns it on
    max_replicas: int | None = None
    engine_num_cpus: float = 1.0  # Ray CPUs per engine replica (fractional to pack CPU replicas)
    gateway_num_cpus: float = 0.25  # Ray CPUs of the gateway replica
    cpu_kv_cache_gib: float | None = None  # per-replica KV cache on cpu; None: engine.cpu_kv_cache_space_gib
    dram_dir: str = "/dev/shm/lull-dram"  # the node's DRAM tier (tmpfs)
    default_max_tokens: int = 256  # output tokens when a client sets no max_tokens
    model_path: str | None = None  # None: model.path, else the embedded tiny model
    policy: str | None = None  # the controller's policy; None: policy.name
    redis_url: str | None = None  # the shared tier; None: tiers.redis_url
    grpc_port: int | None = None  # the gRPC SessionService; None: gateway.grpc_port, 0: off
    gpu_tier_tokens: int | None = None  # the controller's GPU-tier budget per replica; None: the engine's whole cache
    gpu_node_selector: str | None = None  # on Kubernetes: the GPU worker group's nodes, to cap the autoscaler
    gpus_per_replica: int = 1
    gpus_per_pod: int = 1

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not 1 <= self.bounds[0] <= self.replicas <= self.bounds[1] <= 1024:
            raise ValueError(f"need 1 <= min_replicas <= replicas <= max_replicas <= 1024; got "
                             f"{self.min_replicas}, {self.replicas}, {self.max_replicas}")
        if not 0 < self.engine_num_cpus <= 64 or not 0 <= self.gateway_num_cpus <= 64:
            raise ValueError("engine_num_cpus must be in (0, 64] and gateway_num_cpus in [0, 64]")
        if self.cpu_kv_cache_gib is not None and self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"cpu_kv_cache_gib must be positive, got {self.cpu_kv_cache_gib}")
        if self.gpu_tier_tokens is not None and self.gpu_tier_tokens < 1:
            raise ValueError(f"gpu_tier_tokens must be >= 1, got {self.gpu_tier_tokens}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be in [0, 65535], got {self.grpc_port}")
        if not 1 <= self.gpus_per_replica <= self.gpus_per_pod <= 64:
            raise ValueError(f"need 1 <= gpus_per_replica <= gpus_per_pod <= 64; got {self.gpus_per_replica}, "
                             f"{self.gpus_per_pod}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")

    @property
    def bounds(self) -> tuple[int, int]:
        """The engine replica count's (min, max)."""
        return (self.replicas if self.min_replicas is None else self.min_replicas,
                self.replicas if self.max_replicas is None else self.max_replicas)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> PlatformSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown app args {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**args)


def model_dir(settings: PlatformSettings, config: LullConfig) -> str:
    if settings.model_path or config.model.path:
        return str(settings.model_path or config.model.path)
    from workers.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())


def kv_bytes_per_token(model: str, dtype_bytes: int = 4) -> int:
    """K and V of every layer for one token, from the model's config.json."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * dtype_bytes


def engine_settings(settings: PlatformSettings, config: LullConfig) -> dict:
    """`EngineSettings` fields for every replica (each sets its own replica_id)."""
    return dict(model=model_dir(settings, config), device=config.model.device, dtype="float32",
                max_model_len=config.engine.max_model_len, max_num_seqs=config.engine.max_num_seqs,
                cpu_kv_cache_gib=settings.cpu_kv_cache_gib or config.engine.cpu_kv_cache_space_gib,
                gpu_memory_utilization=config.engine.gpu_memory_utilization,
                dram_dir=settings.dram_dir, dram_capacity_bytes=int(config.tiers.dram_capacity_gib * GIB) or 1,
                served_model_name=config.model.served_name)


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
    async def __init__(self, engine_handle, settings: dict, engine: dict):
        self.config = load_config()
        setup_tracing("lull-gateway")  # exports only when the OTEL_* variables ask for it
        self.settings = PlatformSettings(**settings)
        self.controller = ControllerClient(ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE))
        self.engines = ServeEngines(engine_handle)
        self.metrics = make_metrics()  # the process's registry: the node's multiprocess directory
        self.metrics["lull:replicas_target"].set(self.settings.replicas)  # then the autoscaler's, once it decides
        arrivals: dict = {}
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(engine["model"])
        per_token = kv_bytes_per_token(engine["model"])
        physical = int(engine["cpu_kv_cache_gib"] * GIB) // per_token
        # A budget below the engine's cache makes tiering visible on a small machine: the
        # controller admits and demotes within it while vLLM keeps its whole cache.
        gpu_tokens = min(physical, self.settings.gpu_tier_tokens or physical)
        self.capacity = (gpu_tokens, engine["dram_capacity_bytes"] // per_token)
        limits = Limits(max_model_len=engine["max_model_len"], max_prompt_tokens=self.config.max_prompt_tokens,
                        default_max_tokens=self.settings.default_max_tokens,
                        gate_timeout_s=self.config.gateway.gate_timeout_s)
        self.core = GatewayCore(MeteredController(self.controller, arrivals),
                                MeteredEngines(self.engines, self.metrics, arrivals), tokenizer, limits)
        self.model_name = engine["served_model_name"]
        self.registered: dict[str, str] = {}  # replica -> its Ray node
        self._agent_nodes: set[str] = set()  # nodes whose KV agent the controller knows
        self._drains: set[asyncio.Task] = set()
        grpc_port = self.config.gateway.grpc_port if self.settings.grpc_port is None else self.settings.grpc_port
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
        address = await asyncio.to_thread(node_agent_address, self.config, node_id, self.settings.dram_dir,
                                          self.settings.redis_url or self.config.tiers.redis_url)
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


def engine_count(settings: PlatformSettings, config: LullConfig) -> dict:
    """The engine deployment's replica count: fixed, or Lull's autoscaling policy between
    the bounds (``controller.autoscale.serve_policy``) when they differ and it is enabled."""
    low, high = settings.bounds
    if low == high or not config.autoscaling.enabled:
        return {"num_replicas": settings.replicas}
    scaling = AutoscaleSettings.from_config(config)
    kube = None
    if settings.gpu_node_selector:
        kube = dict(node_selector=settings.gpu_node_selector, gpus_per_replica=settings.gpus_per_replica,
                    gpus_per_pod=settings.gpus_per_pod)
    return {"autoscaling_config": engine_autoscaling_config(low, high, settings.replicas, scaling, kube)}


def build_app(args: dict[str, Any] | None = None):
    """The Serve application `lull`: gateway ingress, engine replicas, controller actor."""
    from workers.engine_deployment import LullEngine

    settings = PlatformSettings.from_args(dict(args or {}))
    config = load_config()
    engine = engine_settings(settings, config)
    agents = ensure_node_agents(config, settings.dram_dir, settings.redis_url or config.tiers.redis_url)
    ensure_controller(config, agents, settings.policy or config.policy.name, kv_bytes_per_token(engine["model"]))
    engines = LullEngine.options(
        **engine_count(settings, config), ray_actor_options={"num_cpus": settings.engine_num_cpus},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS),
    ).bind(engine)
    gateway = LullGateway.options(ray_actor_options={"num_cpus": settings.gateway_num_cpus})
    return gateway.bind(engines, dataclasses.asdict(settings), engine)
