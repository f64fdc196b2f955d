"""Each tenant's share of the GPU tier (``auth.quotas``' ``gpu_share``), as the planner reads it.

A tenant's cap is its share of the cluster's GPU tier (every replica's HBM tokens
together). A session whose tenant would exceed its cap by taking HBM may only make
room by displacing its own tenant's sessions; another tenant's session is never moved
for it, and its request otherwise waits (``TierPlanner._room``). Pure: it reads the
planner's view and the state it is given.
"""

from __future__ import annotations

import math
import weakref

from controller.policy.overlay import Overlay
from controller.policy.types import Location, Tier
from proto.names import tenant_of
from proto.quotas import ANY_TENANT


class GpuShares:
    def __init__(self, shares: tuple[tuple[str, float], ...] = ()) -> None:
        """``shares``: (tenant, fraction in (0, 1]); ``"*"``: every tenant not named."""
        for tenant, share in shares:
            if not 0 < share <= 1:
                raise ValueError(f"the GPU share of tenant {tenant!r} must be in (0, 1], got {share}")
        self.named = dict(shares)
        self.default = self.named.pop(ANY_TENANT, None)
        self._usage: tuple[weakref.ref, int, dict[str, int]] | None = None  # (view, its changes, tenant -> tokens)

    def __bool__(self) -> bool:
        return bool(self.named) or self.default is not None

    def over(self, view: Overlay, session_id: str, need: int) -> int:
        """Tokens by which the session's tenant would exceed its cap if the session held ``need``
        HBM tokens (its current HBM counted once); <= 0: within its share, or no share."""
        if not self:
            return 0
        tenant = tenant_of(session_id)
        share = self.named.get(tenant, self.default)
        if share is None or share >= 1:
            return 0
        state = view.state
        total = sum(state.capacity[Location(Tier.GPU, r)] for r in state.replicas)
        held = view.footprint(session_id) if view.location(session_id).tier is Tier.GPU else 0
        return self._used(view).get(tenant, 0) - held + need - math.floor(share * total)

    def _used(self, view: Overlay) -> dict[str, int]:
        """HBM tokens each tenant holds in the view; recounted only after a decision changed it."""
        if self._usage is not None and self._usage[0]() is view and self._usage[1] == view.changes:
            return self._usage[2]
        used: dict[str, int] = {}
        for replica in view.state.replicas:
            for session_id in view.residents(Location(Tier.GPU, replica)):
                tenant = tenant_of(session_id)
                used[tenant] = used.get(tenant, 0) + view.footprint(session_id)
        self._usage = (weakref.ref(view), view.changes, used)
        return used
