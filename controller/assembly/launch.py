"""Start what the Serve app needs beside itself: a node agent per Ray node and the controller actor.

The controller owns replica membership; it gets from here what it needs to start the agent
of a node that joins later (``agent_starter``), and each engine replica gets the
capacity it registers with (``replica_capacity``).

Both are named and found again when they exist (`get_if_exists`), so `build_app`
may run again (a redeploy) without starting a second controller or agent.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from controller.assembly.settings import gpu_tier_tokens
from controller.policy import PlannerConfig
from proto.config import GIB, LullConfig
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE, node_agent_actor

log = logging.getLogger(__name__)


def ensure_node_agents(config: LullConfig) -> dict[str, str]:
    """A KV agent on every alive Ray node; returns node id -> its gRPC address."""
    agents = {node["NodeID"]: start_node_agent(config, node["NodeID"]) for node in ray.nodes() if node["Alive"]}
    addresses = dict(zip(agents, ray.get([a.address.remote() for a in agents.values()])))
    log.info("node agents: %s", ", ".join(f"{n[:8]}={a}" for n, a in addresses.items()))
    return addresses


def start_node_agent(config: LullConfig, node_id: str):
    """The KV agent of Ray node ``node_id`` (named, detached, pinned there), started when absent."""
    from workers.node_agent_actor import NodeAgentActor

    tiers = config.tiers
    redis_url = tiers.redis_url if tiers.shared_capacity_gib > 0 else None
    return NodeAgentActor.options(
        name=node_agent_actor(node_id), namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(node_id, tiers.dram_dir, max(1, int(tiers.dram_capacity_gib * GIB)), redis_url=redis_url,
             shared_capacity_bytes=int(tiers.shared_capacity_gib * GIB) if redis_url else 0,
             port=tiers.node_agent_port, metrics_port=config.telemetry.metrics_port, host=tiers.node_agent_host)


def agent_starter(config: LullConfig) -> Callable[[str], Any]:
    """What the controller calls to start the agent of a node that joined after launch
    (``node id -> agent handle``): the controller runtime never imports the workers."""
    return functools.partial(start_node_agent, config)


def replica_capacity(config: LullConfig, engine: dict, per_token: int) -> dict[str, int]:
    """The KV tokens the controller books on each engine replica, which the replica registers
    with: its GPU tier, which is its whole KV cache (``tiers.gpu_tier_tokens`` sizes the
    engine's cache to it, ``settings.engine_settings``; unset, an estimate from
    ``cpu_kv_cache_gib`` that each replica replaces with the cache vLLM really allocated,
    ``workers.engine_deployment.registered_capacity``), and its node's DRAM tier;
    ``per_token``: the KV bytes of one token in the engine's type."""
    tier = gpu_tier_tokens(config)
    gpu = tier if tier is not None else int(engine["cpu_kv_cache_gib"] * GIB) // per_token
    return {"gpu_tokens": gpu, "dram_tokens": engine["dram_capacity_bytes"] // per_token}


def ensure_controller(config: LullConfig, agents: dict[str, str], bytes_per_token: int,
                      start_agent: Callable[[str], Any] | None = None):
    """The named, detached controller actor, started (books rebuilt, tick running) when absent."""
    try:
        return ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
    except ValueError:
        pass
    from controller.runtime.actor import launch_controller

    policy = config.policy.name
    shared = int(config.tiers.shared_capacity_gib * GIB) // bytes_per_token
    actor = launch_controller(agents, detached=True, policy=policy, planner_config=PlannerConfig.from_config(config),
                              tick_s=config.policy.tick_seconds, idleness_window=config.policy.idleness_window,
                              bytes_per_token=bytes_per_token, metrics=True, shared_tokens=shared,
                              start_agent=start_agent, session_ttl_s=config.policy.session_idle_ttl_s,
                              reconcile_s=config.policy.reconcile_interval_s, block_tokens=config.engine.block_size)
    restored = ray.get(actor.start.remote(shared))
    log.info("controller started (policy %s, %d sessions restored)", policy, restored)
    return actor
