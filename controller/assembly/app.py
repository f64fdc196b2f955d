"""The Serve application: the `LullGateway` ingress over the `LullEngine` replicas and the controller actor.

`build_app(args)` is Serve's entry point (`controller.assembly:build_app`). The engine
deployment routes with `LullRouter`, so a call reaches the replica the
controller placed its session on; each engine replica registers itself with the
controller (with the capacity given here) and deregisters when it stops. The
controller is a named, detached Ray actor that outlives gateway restarts;
`build_app` starts it, and a KV agent per Ray node, only when they are absent.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray.serve.config import RequestRouterConfig

from controller.assembly.launch import agent_starter, ensure_controller, ensure_node_agents, replica_capacity
from controller.assembly.settings import PlatformSettings, engine_settings, kv_bytes_per_token
from controller.autoscale.policy import AutoscaleSettings
from controller.autoscale.serve_policy import engine_autoscaling_config
from controller.gateway.deployment import LullGateway
from controller.gateway.router import ROUTER_CLASS
from proto.config import LullConfig, load_config


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
    redis_url = settings.redis_url or config.tiers.redis_url
    agents = ensure_node_agents(config, settings.dram_dir, redis_url)
    ensure_controller(config, agents, settings.policy or config.policy.name, kv_bytes_per_token(engine["model"]),
                      agent_starter(config, settings.dram_dir, redis_url))
    engines = LullEngine.options(
        **engine_count(settings, config), ray_actor_options={"num_cpus": settings.engine_num_cpus},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS),
    ).bind(engine, replica_capacity(engine, settings.gpu_tier_tokens))
    gateway = LullGateway.options(ray_actor_options={"num_cpus": settings.gateway_num_cpus})
    return gateway.bind(engines, dataclasses.asdict(settings), engine)
