"""Start what the Serve app needs beside itself: a node agent per Ray node and the controller actor.

Both are named and found again when they exist (`get_if_exists`), so `build_app`
may run again (a redeploy) without starting a second controller or agent.
"""

from __future__ import annotations

import logging

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
             port=tiers.node_agent_port, metrics_port=config.telemetry.metrics_port)


def node_agent_address(config: LullConfig, node_id: str) -> str:
    """Start (or find) the node's agent and return its gRPC address (blocks: run off the loop)."""
    return ray.get(start_node_agent(config, node_id).address.remote(), timeout=120)


def alive_nodes() -> set[str]:
    """Ray's alive nodes (blocks: run off the loop)."""
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def ensure_controller(config: LullConfig, agents: dict[str, str], bytes_per_token: int):
    """The named, detached controller actor, started (books rebuilt, tick running) when absent."""
    try:
        return ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
    except ValueError:
        pass
    from controller.runtime.actor import launch_controller

    policy = config.policy.name
    actor = launch_controller(agents, detached=True, policy=policy, planner_config=PlannerConfig.from_config(config),
                              tick_s=config.policy.tick_seconds, idleness_window=config.policy.idleness_window,
                              bytes_per_token=bytes_per_token, metrics=True)
    shared = int(config.tiers.shared_capacity_gib * GIB) // bytes_per_token
    restored = ray.get(actor.start.remote([], shared))
    log.info("controller started (policy %s, %d sessions restored)", policy, restored)
    return actor
