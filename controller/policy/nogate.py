"""The no-gating planner of the ``lru-offload`` baseline (vLLM prefix caching +
write-through offload): the controller admits, places and releases, and leaves the
KV to the engine's own LRU cache."""

from __future__ import annotations

from controller.policy.state import ClusterState
from controller.policy.types import Admit, Location, Move, MoveReason, Phase, Plan, Release, Tier


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
