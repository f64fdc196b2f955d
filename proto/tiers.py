"""The KV tiers, spelled once: the enum every part speaks, and its one conversion table
to the wire (``tiers_pb2.Tier``) and to the short labels that travel in engine
requests, metrics and JSON (``"gpu"``, ``"dram"``, ``"shared"``, ``"waiting"``)."""

from __future__ import annotations

import enum

from proto import tiers_pb2


class Tier(enum.IntEnum):
    """KV tiers, fastest first. The order is the demotion order."""

    GPU = 0
    DRAM = 1  # the node's host memory: belongs to one replica's node
    SHARED = 2  # cluster-wide (Redis / LMCache server)
    WAITING = 3  # KV dropped; the next call recomputes it. Unbounded.

    @property
    def per_replica(self) -> bool:
        return self in (Tier.GPU, Tier.DRAM)

    @property
    def label(self) -> str:
        """The short name: engine requests' tier label, metric labels, JSON."""
        return _LABEL[self]

    @property
    def pb(self) -> int:
        """The ``tiers_pb2.Tier`` value."""
        return _TO_PB[self]

    @classmethod
    def from_label(cls, label: str) -> Tier:
        try:
            return _FROM_LABEL[label]
        except KeyError:
            raise ValueError(f"unknown tier {label!r}; valid: {', '.join(_FROM_LABEL)}") from None

    @classmethod
    def from_pb(cls, value: int) -> Tier:
        """Raises ValueError for TIER_UNSPECIFIED and values this build does not know."""
        try:
            return _FROM_PB[value]
        except KeyError:
            raise ValueError(f"tier {value} is not a known tiers_pb2.Tier") from None


# The one conversion table: enum, wire value, label.
_TABLE = (
    (Tier.GPU, tiers_pb2.TIER_GPU, "gpu"),
    (Tier.DRAM, tiers_pb2.TIER_DRAM, "dram"),
    (Tier.SHARED, tiers_pb2.TIER_SHARED, "shared"),
    (Tier.WAITING, tiers_pb2.TIER_WAITING, "waiting"),
)
_TO_PB = {tier: pb for tier, pb, _ in _TABLE}
_FROM_PB = {pb: tier for tier, pb, _ in _TABLE}
_LABEL = {tier: label for tier, _, label in _TABLE}
_FROM_LABEL = {label: tier for tier, _, label in _TABLE}
TIER_LABELS: tuple[str, ...] = tuple(label for _, _, label in _TABLE)
