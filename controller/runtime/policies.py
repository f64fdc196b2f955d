"""The controller's policies, by the names the runtime has always used. Each is
defined once, in ``controller.policy.policies`` (the core), where the simulator
finds the very same definitions."""

from controller.policy.nogate import NoGatePlanner
from controller.policy.policies import POLICY_DEFINITIONS, UNBOUNDED_TOKENS, Planner, PolicyDefinition

LIVE_POLICIES = POLICY_DEFINITIONS
LivePolicy = PolicyDefinition

__all__ = ["LIVE_POLICIES", "UNBOUNDED_TOKENS", "LivePolicy", "NoGatePlanner", "Planner"]
