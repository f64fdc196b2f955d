"""The policy core: pure, clock-injected. ``ClusterState`` is the session table fed
by events; ``TierPlanner.plan(state, now)`` returns typed decisions;
``POLICY_DEFINITIONS`` names every policy once; ``PlanDriver`` is the one event ->
plan -> apply loop the live controller and the simulator both run."""

from controller.policy.driver import Mechanism, PlanDriver
from controller.policy.idleness import DEFAULT_CYCLES, IdlenessHistory
from controller.policy.nogate import NoGatePlanner
from controller.policy.planner import PlannerConfig, TierPlanner
from controller.policy.policies import POLICY_DEFINITIONS, UNBOUNDED_TOKENS, Planner, PolicyDefinition
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
    SourceLost,
    StaleDecision,
    Tier,
    UnknownSession,
)

__all__ = [
    "DEFAULT_CYCLES",
    "POLICY_DEFINITIONS",
    "UNBOUNDED_TOKENS",
    "Admit",
    "ClusterState",
    "Gate",
    "IdlenessHistory",
    "Location",
    "Mechanism",
    "Move",
    "MoveReason",
    "NoGatePlanner",
    "Phase",
    "Plan",
    "PlanDriver",
    "Planner",
    "PlannerConfig",
    "PolicyDefinition",
    "Release",
    "ReplicaSpec",
    "SessionRecord",
    "SourceLost",
    "StaleDecision",
    "Tier",
    "TierPlanner",
    "UnknownSession",
]
