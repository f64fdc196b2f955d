"""The gateway's per-tenant quotas (``proto.quotas``): requests per second and sessions in flight.

``TenantGate.enter`` is called once per generating call, before the prompt is counted,
so a tenant over its quota costs the gateway almost nothing and never delays another
tenant: each tenant has its own bucket and its own count, and nothing is shared but a
dict lookup. Over quota is an `ApiError` 429 with `Retry-After` (gRPC: RESOURCE_EXHAUSTED).
The limits hold per gateway replica (each keeps its own counts; no call leaves the process).

The GPU share is not here: it is the planner's (``controller.policy.planner``), where
placement is decided.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

from controller.gateway.protocol import ApiError
from proto.quotas import Quota, Quotas


class Ticket:
    """A call's hold on its tenant's session count; ``release`` once the call ended (idempotent)."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None] | None) -> None:
        self._release = release

    def __bool__(self) -> bool:
        """Whether the call holds anything (False for a tenant without a quota)."""
        return self._release is not None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class TenantGate:
    def __init__(self, quotas: Quotas, clock: Callable[[], float] = time.monotonic) -> None:
        self.quotas, self.clock = quotas, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._in_flight: dict[str, Counter[str]] = {}  # tenant -> {session key: calls in flight}

    def enter(self, tenant: str, key: str) -> Ticket:
        """Count a generating call of ``key`` (a session of ``tenant``), or raise a 429."""
        quota = self.quotas.of(tenant)
        if quota.unlimited:
            return Ticket(None)
        sessions = self._in_flight.setdefault(tenant, Counter())
        if quota.max_sessions is not None and key not in sessions and len(sessions) >= quota.max_sessions:
            raise over_quota(tenant, f"has {len(sessions)} sessions with a call in flight, its quota "
                                     f"(max_sessions {quota.max_sessions})", 1)
        self._take(tenant, quota)
        sessions[key] += 1
        return Ticket(lambda: self._leave(tenant, key))

    def in_flight(self, tenant: str) -> int:
        return len(self._in_flight.get(tenant, ()))

    def _take(self, tenant: str, quota: Quota) -> None:
        """One call from the tenant's bucket: ``rps`` calls a second, at most one second's saved."""
        rate = quota.requests_per_second
        if rate is None:
            return
        now = self.clock()
        tokens, at = self._buckets.get(tenant, (max(1.0, rate), now))
        tokens = min(max(1.0, rate), tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[tenant] = (tokens, now)
            raise over_quota(tenant, f"sent more than its quota of {rate:g} requests per second",
                             math.ceil((1.0 - tokens) / rate))
        self._buckets[tenant] = (tokens - 1.0, now)

    def _leave(self, tenant: str, key: str) -> None:
        sessions = self._in_flight[tenant]
        sessions[key] -= 1
        if sessions[key] <= 0:
            del sessions[key]


def over_quota(tenant: str, what: str, retry_s: int) -> ApiError:
    retry = max(1, retry_s)
    return ApiError(429, f"tenant {tenant!r} {what}; retry after {retry} s", type="requests",
                    code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
