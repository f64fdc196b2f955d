"""The live controller's policies, registered by name (``policy.name`` in the config).

A live policy is a planner (anything with ``plan(state, now) -> Plan``) plus how the
controller drives it:

- ``lull``: the tier planner as configured; plans on every event (a request is
  admitted at once when capacity allows), the tick is a backstop.
- ``mori``: MORI as published, as ``loadgen.sim.policies.MoriPolicy``: no shared tier
  (DRAM overflow drops KV), no prefetch, and plans only on the tick, so an arriving
  request waits for the next tick.
- ``lru-offload``: the no-gating baseline (vLLM prefix caching + write-through
  offload, LRU). Every request is admitted at once to its sticky replica (a new or
  dropped session: the one with the fewest sessions); the controller moves no KV and
  labels requests ``dram`` (write through, then leave the blocks to vLLM's LRU).
  Its GPU tier is unbounded in the books: the engine's own LRU is the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from controller.policy import ClusterState, Location, Move, MoveReason, Plan, PlannerConfig, Tier, TierPlanner
from controller.policy.types import Admit, Phase, Release
from proto.registry import Registry

UNBOUNDED_TOKENS = 10**15  # a GPU tier the controller never fills (lru-offload)


class Planner(Protocol):
    def plan(self, state: ClusterState, now: float) -> Plan: ...


@dataclass(frozen=True)
class LivePolicy:
    make_planner: Callable[[PlannerConfig], Planner]
    event_driven: bool  # plan on every event; False: only on the tick
    moves_kv: bool  # carry moves out through the node agents; False: books only
    shared_tier: bool
    tier_label: str  # what admitted requests carry to the engine: "gpu" holds KV in HBM
    unbounded_gpu: bool = False


LIVE_POLICIES: Registry[LivePolicy] = Registry("controller policy")

LIVE_POLICIES.register("lull", LivePolicy(TierPlanner, True, True, True, "gpu"))
LIVE_POLICIES.register("mori", LivePolicy(
    lambda config: TierPlanner(replace(config, shared_tier=False, prefetch=False)),
    event_driven=False, moves_kv=True, shared_tier=False, tier_label="gpu"))


class NoGatePlanner:
    """Admit every waiting request at once on its sticky replica; release closed
    sessions; never demote. The books follow the session to the GPU tier of its
    replica, where the engine's LRU prefix cache keeps what fits."""

    def plan(self, state: ClusterState, now: float) -> Plan:
        releases, moves, admits = [], [], []
        load = {r: len(state.residents[Location(Tier.GPU, r)]) for r in state.replicas}
        for session_id in state.attention:
            record = state.sessions[session_id]
            if record.closing:
                if record.phase is not Phase.LLM:
                    releases.append(Release(session_id, record.location))
                continue
            if record.phase is not Phase.GATED or record.request is None or not load:
                continue
            here = record.location
            replica = here.replica if here.replica is not None else min(load, key=lambda r: (load[r], r))
            need = record.request.need_tokens
            if here != Location(Tier.GPU, replica):
                moves.append(Move(session_id, here, Location(Tier.GPU, replica), need, MoveReason.PROMOTE))
                load[replica] += 1
            admits.append(Admit(session_id, replica, need))
        return Plan(releases=tuple(releases), moves=tuple(moves), admits=tuple(admits))


LIVE_POLICIES.register("lru-offload", LivePolicy(
    lambda config: NoGatePlanner(), event_driven=True, moves_kv=False, shared_tier=False,
    tier_label="dram", unbounded_gpu=True))
