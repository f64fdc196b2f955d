"""The Serve application: the `LullGateway` ingress over the `LullEngine` replicas and the controller actor.

`build_app(args)` is Serve's entry point (`controller.assembly:build_app`). Its args are
config overrides, ``{section: {setting: value}}``, laid over `load_config()`; the one
config that results is what every part is built from, the gateway included. The engine
deployment routes with `LullRouter`, so a call reaches the replica the controller placed
its session on; each engine replica registers itself with the controller (with the
capacity given here) and deregisters when it stops. The controller is a named, detached
Ray actor that outlives gateway restarts; `build_app` starts it, and a KV agent per Ray
node, only when they are absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray
from ray.serve.config import RequestRouterConfig

from controller.assembly.launch import agent_starter, ensure_controller, ensure_node_agents, replica_capacity
from controller.assembly.settings import check_fits, engine_settings, kv_bytes_per_token, replica_asks
from controller.autoscale.policy import AutoscaleSettings
from controller.autoscale.serve_policy import engine_autoscaling_config
from controller.gateway.deployment import LullGateway
from controller.gateway.router import ROUTER_CLASS
from controller.runtime import LIVE_POLICIES
from proto.config import ConfigError, LullConfig, load_config


def launch_config(overrides: Mapping[str, Any] | None = None) -> LullConfig:
    """The config with ``overrides`` laid over it, checked for what only the assembly knows:
    the policy's name against the registered policies (the config checks only its syntax)."""
    config = load_config(overrides=overrides)
    if config.policy.name not in LIVE_POLICIES:
        raise ConfigError(f"policy.name {config.policy.name!r} is no registered policy; "
                          f"valid: {', '.join(LIVE_POLICIES.names())}")
    return config


def engine_count(config: LullConfig) -> dict:
    """The engine deployment's replica count: fixed, or Lull's autoscaling policy between
    the bounds (``controller.autoscale.serve_policy``) when they differ and it is enabled."""
    replicas = config.replicas
    if replicas.min == replicas.max or not config.autoscaling.enabled:
        return {"num_replicas": replicas.initial}
    scaling = AutoscaleSettings.from_config(config)
    kube = None
    if config.cluster.gpu_node_selector:
        kube = dict(node_selector=config.cluster.gpu_node_selector,
                    gpus_per_replica=config.engine.tensor_parallel_size, gpus_per_pod=config.cluster.gpus_per_pod)
    return {"autoscaling_config": engine_autoscaling_config(replicas.min, replicas.max, replicas.initial, scaling,
                                                           kube)}


def actor_options(config: LullConfig) -> dict[str, dict]:
    """Each deployment's ``ray_actor_options``: the Ray resources one replica asks for."""
    engine, gateway = replica_asks(config)
    custom = {k: v for k, v in gateway.resources.items() if k != "CPU"}  # cluster.gateway_resource
    return {
        "engine": {"num_cpus": engine.resources["CPU"], "num_gpus": engine.resources.get("GPU", 0.0)},
        "gateway": {"num_cpus": gateway.resources["CPU"], **({"resources": custom} if custom else {})},
    }


def build_app(args: dict[str, Any] | None = None):
    """The Serve application `lull`: gateway ingress, engine replicas, controller actor."""
    from workers.engine_deployment import LullEngine

    config = launch_config(args)
    if not config.cluster.autoscaled_nodes:  # else Ray adds nodes that fit: none alive may yet
        check_fits(replica_asks(config), ray.nodes())
    engine = engine_settings(config)
    agents = ensure_node_agents(config)
    per_token = kv_bytes_per_token(engine["model"], engine["dtype"])
    ensure_controller(config, agents, per_token, agent_starter(config))
    options = actor_options(config)
    engines = LullEngine.options(
        **engine_count(config), ray_actor_options=options["engine"],
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS),
    ).bind(engine, replica_capacity(config, engine, per_token))
    gateway = LullGateway.options(ray_actor_options=options["gateway"])
    return gateway.bind(engines, config, engine)
