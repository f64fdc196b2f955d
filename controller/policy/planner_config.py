"""The tier planner's settings (``TierPlanner``), from Lull's config or given directly (the simulator)."""

from __future__ import annotations

from dataclasses import dataclass

from proto.config import LullConfig
from proto.quotas import Quotas


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    displacement: bool = True
    """Let a session that wants HBM displace more idle GPU residents."""
    displace_margin: float = 0.0
    """A victim must be more idle than the requester by more than this (hysteresis)."""
    displacement_candidates: int = 8
    """How many replicas (most free HBM first) to try displacing on for one request."""
    prefetch: bool = True
    """Promote a session when the client reports its tool call finished."""
    shared_tier: bool = True
    """Use the cluster-wide shared tier; without it, DRAM overflow drops KV."""
    starvation_age_s: float | None = 30.0
    """A request waiting this long goes first and holds a GPU tier (see the module doc); None: off."""
    gpu_shares: tuple[tuple[str, float], ...] = ()
    """Tenants' shares of the GPU tier (``controller.policy.shares``; "*": every tenant not named); (): none."""

    def __post_init__(self) -> None:
        if self.starvation_age_s is not None and not self.starvation_age_s > 0:
            raise ValueError(f"starvation_age_s must be > 0 or None, got {self.starvation_age_s}")
        if not 0.0 <= self.displace_margin < 1.0:
            raise ValueError(f"displace_margin must be in [0, 1), got {self.displace_margin}")
        if self.displacement_candidates < 1:
            raise ValueError(f"displacement_candidates must be >= 1, got {self.displacement_candidates}")

    @classmethod
    def from_config(cls, config: LullConfig) -> PlannerConfig:
        """The planner for Lull's settings (``policy.*``; the shared tier is on when it has bytes)."""
        return cls(displacement=config.policy.displacement, displace_margin=config.policy.displace_margin,
                   prefetch=config.policy.prefetch, shared_tier=config.tiers.shared_capacity_gib > 0,
                   gpu_shares=Quotas(config.auth.quotas).gpu_shares())
