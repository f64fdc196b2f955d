"""Per-tenant quotas: the vocabulary the config, the gateway and the planner share.

A tenant's quota bounds what it may take of what all tenants share:

- ``max_sessions``: sessions with a call in flight (running or waiting at the gate) at once;
- ``requests_per_second``: generating calls per second (a bucket of one second's calls);
- ``gpu_share``: the fraction of the cluster's GPU tier (HBM tokens) its sessions may hold;
  past it, its requests wait or displace its own sessions, never another tenant's.

Configured as ``auth.quotas``: ``{tenant: {setting: value}}``; the entry ``"*"`` applies to
every tenant, and a named tenant's entry overrides its fields. A field left out (or null)
is unlimited, and so is everything when no quota is configured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from proto.config_checks import Check, ConfigError
from proto.names import ID_PATTERN

ANY_TENANT = "*"
MAX_RPS = 1e6


@dataclass(frozen=True)
class Quota:
    max_sessions: int | None = None
    requests_per_second: float | None = None
    gpu_share: float | None = None

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


UNLIMITED = Quota()
_FIELDS = {f.name for f in fields(Quota)}


def quota_problem(name: str, value: Any) -> str:
    """Why ``value`` is not a quotas mapping, naming the setting; empty when it is one."""
    if not isinstance(value, Mapping):
        return f"{name} must map tenants to {{max_sessions, requests_per_second, gpu_share}}; got {value!r:.100}"
    for tenant, entry in value.items():
        where = f"{name}.{tenant}"
        if tenant != ANY_TENANT and not (isinstance(tenant, str) and ID_PATTERN.fullmatch(tenant)):
            return f"{name}: {tenant!r:.140} is no tenant name (1 to 128 of A-Z a-z 0-9 . _ : -, or '*')"
        if not isinstance(entry, Mapping):
            return f"{where} must be a mapping of max_sessions, requests_per_second, gpu_share; got {entry!r:.100}"
        for key, limit in entry.items():
            if key not in _FIELDS:
                return f"unknown quota {where}.{key}; valid: {', '.join(sorted(_FIELDS))}"
            if limit is not None and (problem := _limit_problem(key, limit)):
                return f"{where}.{key} must be {problem}, or null (unlimited); got {limit!r:.100}"
    return ""


def _limit_problem(key: str, limit: Any) -> str:
    if key == "max_sessions":
        return "" if type(limit) is int and 1 <= limit <= 10**9 else "an integer in [1, 1000000000]"
    number = type(limit) in (int, float) and math.isfinite(limit)
    if key == "requests_per_second":
        return "" if number and 0 < limit <= MAX_RPS else f"a number in (0, {MAX_RPS:g}]"
    return "" if number and 0 < limit <= 1 else "a fraction in (0, 1]"


class TenantQuotas(Check):
    """The ``auth.quotas`` setting (see the module docstring); JSON in the environment."""

    allowed = "a mapping of tenants ('*': every tenant) to {max_sessions, requests_per_second, gpu_share}"

    def validate(self, name: str, value: Any) -> None:
        if problem := quota_problem(name, value):
            raise ConfigError(problem)

    def accepts(self, value: Any) -> bool:
        return not quota_problem("quotas", value)

    def parse(self, name: str, text: str) -> Any:
        return self._convert(name, text, json.loads)

    def schema(self) -> dict[str, Any]:
        limits = {"max_sessions": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
                  "requests_per_second": {"anyOf": [{"type": "number", "exclusiveMinimum": 0,
                                                     "maximum": MAX_RPS}, {"type": "null"}]},
                  "gpu_share": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                                          {"type": "null"}]}}
        entry = {"type": "object", "additionalProperties": False, "properties": limits}
        return {"type": "object", "additionalProperties": entry}


class Quotas:
    """Each tenant's ``Quota``, from the ``auth.quotas`` setting (None or {}: all unlimited)."""

    def __init__(self, setting: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        setting = setting or {}
        if problem := quota_problem("quotas", setting):
            raise ConfigError(problem)
        base = dict(setting.get(ANY_TENANT) or {})
        self.default = Quota(**base)
        self.named = {t: Quota(**{**base, **entry}) for t, entry in setting.items() if t != ANY_TENANT}

    def of(self, tenant: str) -> Quota:
        return self.named.get(tenant, self.default)

    @property
    def unlimited(self) -> bool:
        return self.default.unlimited and all(q.unlimited for q in self.named.values())

    def gpu_shares(self) -> tuple[tuple[str, float], ...]:
        """(tenant, share) for each named tenant and ``"*"`` (every other tenant) when it has a share."""
        shares = [(t, q.gpu_share or 1.0) for t, q in self.named.items()]  # named, unlimited: the whole tier
        if self.default.gpu_share is not None:
            shares.append((ANY_TENANT, self.default.gpu_share))
        return tuple(sorted(shares))
