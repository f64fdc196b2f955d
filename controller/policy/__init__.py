"""The policy core: pure, clock-injected. ``ClusterState`` is the session table fed
by events; ``TierPlanner.plan(state, now)`` returns typed decisions."""

from controller.policy.idleness import DEFAULT_CYCLES, IdlenessHistory
from controller.policy.planner import PlannerConfig, TierPlanner
from controller.policy.state import ClusterState, ReplicaSpec, SessionRecord
from controller.policy.types import (
    Admit,
    Gate,
    Location,
    Move,
    MoveReason,
    Phase,
    Plan,
    Release,
    StaleDecision,
    Tier,
    UnknownSession,
)

__all__ = [
    "DEFAULT_CYCLES",
    "Admit",
    "ClusterState",
    "Gate",
    "IdlenessHistory",
    "Location",
    "Move",
    "MoveReason",
    "Phase",
    "Plan",
    "PlannerConfig",
    "Release",
    "ReplicaSpec",
    "SessionRecord",
    "StaleDecision",
    "Tier",
    "TierPlanner",
    "UnknownSession",
]
