"""Every tier policy, defined once: a name and its switches, as data.

The live controller (``controller.runtime.live``) and the simulator
(``loadgen.sim.driven``) both look a policy up here and run it through the same
``PlanDriver``; ``policy.name`` in the config and ``lull up --policy`` choose among
``POLICY_DEFINITIONS.names()``.

- ``lull``: the tier planner as configured; plans on every event (a request is
  admitted at once when capacity allows), the tick is a backstop.
- ``mori``: MORI ("Idleness is Relative", 2026) as published: the same idleness
  ranking over HBM and host DRAM only (no shared tier: DRAM overflow drops KV), no
  prefetch, and plans only on the tick: a request waits for the next tick unless its
  session's KV is in HBM and its growth fits there, when it runs at once (the paper's
  GPU queue, whose requests go straight to the engine, as ThunderAgent, which MORI is
  built on, forwards an active program's request). It shares the planner's promotion rules with ``lull``, but not its
  anti-starvation rule (``starvation_age_s``): the paper has no aging.
- ``lru-offload``: the no-gating baseline (vLLM prefix caching + write-through
  offload, LRU; LMCache's "CPU offloading"). Every request is admitted at once to its
  sticky replica (a new or dropped session: the one with the fewest sessions); the
  controller moves no KV and labels requests ``dram`` (write through, then leave the
  blocks to vLLM's LRU). Its GPU tier is unbounded in the books: the engine's own LRU
  is the limit.
- ``vllm-lru``: vLLM with automatic prefix caching alone: no gating, no offload. As
  ``lru-offload``, but requests are labelled ``waiting``: the connector neither holds
  nor writes through their KV, so what vLLM's LRU evicts is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from controller.policy.nogate import NoGatePlanner
from controller.policy.planner import PlannerConfig, TierPlanner
from controller.policy.state import ClusterState, ReplicaSpec
from controller.policy.types import WAITING, Location, Plan, Tier
from proto.registry import Registry

UNBOUNDED_TOKENS = 10**15  # a GPU tier the controller never fills (lru-offload)


class Planner(Protocol):
    def plan(self, state: ClusterState, now: float) -> Plan: ...


@dataclass(frozen=True)
class PolicyDefinition:
    summary: str  # one line, for help texts and reports
    make_planner: Callable[[PlannerConfig], Planner]  # from the configured planner settings
    event_driven: bool  # plan on every event; False: only on the tick
    moves_kv: bool  # the controller moves KV between tiers; False: books only, the engine's cache holds it
    shared_tier: bool  # may use the cluster-wide shared tier
    admitted_tier: Tier  # the tier label admitted requests carry to the engine (see ``tier_label``)
    unbounded_gpu: bool = False  # the books never fill HBM: the engine's own eviction is the limit
    # Between plans, a request of a session held in HBM runs at once where its growth fits
    # (``PlanDriver.admit_resident``); only matters when not ``event_driven``.
    admits_resident: bool = False

    def __post_init__(self) -> None:
        if self.admitted_tier is Tier.SHARED:
            raise ValueError("admitted_tier must be GPU (hold KV in HBM), DRAM (write through) or WAITING "
                             "(leave it to vLLM's prefix cache), got SHARED")
        if self.admitted_tier is not Tier.GPU and self.moves_kv:
            raise ValueError("a policy that moves KV holds its admitted sessions in HBM: admitted_tier must be GPU")

    @property
    def tier_label(self) -> str:
        """The engine request's tier: ``gpu`` holds KV in HBM after the call, ``dram``
        writes it through to the node's DRAM tier, ``waiting`` leaves it to vLLM's own
        prefix cache (the connector neither holds, writes nor loads it)."""
        return self.admitted_tier.label

    def replica_spec(self, replica_id: str, gpu_tokens: int, dram_tokens: int) -> ReplicaSpec:
        """The replica as this policy's books hold it."""
        gpu = UNBOUNDED_TOKENS if self.unbounded_gpu else gpu_tokens
        return ReplicaSpec(replica_id, gpu, dram_tokens if self.moves_kv else 0)

    def shared_tokens(self, tokens: int) -> int:
        """The shared tier's capacity in this policy's books."""
        return tokens if self.shared_tier else 0

    def booked_at(self, where: Location) -> Location:
        """Where the books file KV found in ``where`` (rebuilding after a restart)."""
        if not self.moves_kv and where.replica is not None:
            return Location(Tier.GPU, where.replica)  # the session stays booked on its replica
        if where.tier is Tier.SHARED and not self.shared_tier:
            return WAITING
        return where


def _mori_planner(config: PlannerConfig) -> TierPlanner:
    return TierPlanner(replace(config, shared_tier=False, prefetch=False, starvation_age_s=None))


def _no_gate_planner(config: PlannerConfig) -> NoGatePlanner:
    return NoGatePlanner()  # no setting of the tier planner applies


POLICY_DEFINITIONS: Registry[PolicyDefinition] = Registry("controller policy")

POLICY_DEFINITIONS.register("lull", PolicyDefinition(
    "idleness-ranked tiers GPU/DRAM/shared, planned on every event", TierPlanner,
    event_driven=True, moves_kv=True, shared_tier=True, admitted_tier=Tier.GPU))
POLICY_DEFINITIONS.register("mori", PolicyDefinition(
    "MORI: idleness-ranked GPU/DRAM, no shared tier, no prefetch, planned on the tick", _mori_planner,
    event_driven=False, moves_kv=True, shared_tier=False, admitted_tier=Tier.GPU, admits_resident=True))
POLICY_DEFINITIONS.register("lru-offload", PolicyDefinition(
    "no gating: vLLM's LRU prefix cache with write-through DRAM offload", _no_gate_planner,
    event_driven=True, moves_kv=False, shared_tier=False, admitted_tier=Tier.DRAM, unbounded_gpu=True))
POLICY_DEFINITIONS.register("vllm-lru", PolicyDefinition(
    "no gating, no offload: vLLM's LRU prefix cache alone", _no_gate_planner,
    event_driven=True, moves_kv=False, shared_tier=False, admitted_tier=Tier.WAITING, unbounded_gpu=True))
