"""The policy core's vocabulary: tiers, phases, locations and typed decisions.

Decisions are plain values. The planner returns them; mechanisms (the node agents
and engines live, the simulator offline) carry them out; ``ClusterState.apply``
records them once carried out. Nothing here has side effects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from proto.tiers import Tier


class Phase(enum.Enum):
    """Where a session is in its LLM/tool cycle."""

    LLM = "llm"  # a call is running in an engine: its KV is pinned on the GPU
    TOOL = "tool"  # between calls: a tool call or a human turn
    GATED = "gated"  # a request arrived and waits for GPU capacity


class Location(NamedTuple):
    """A tier, and the replica for per-replica tiers (GPU, DRAM); None otherwise.

    A tuple, not a dataclass: the planner hashes locations in its inner loops.
    Build them with ``Location.of`` where the pair is not known to be valid.
    """

    tier: Tier
    replica: str | None = None

    @classmethod
    def of(cls, tier: Tier, replica: str | None = None) -> Location:
        if tier.per_replica != (replica is not None):
            raise ValueError(f"a {tier.name} location {'needs' if tier.per_replica else 'takes no'} replica")
        return cls(tier, replica)

    def __str__(self) -> str:
        return f"{self.tier.name}@{self.replica}" if self.replica else self.tier.name


WAITING = Location(Tier.WAITING)
SHARED = Location(Tier.SHARED)


class MoveReason(enum.Enum):
    OVERFLOW = "overflow"  # the source tier is over its capacity
    DISPLACED = "displaced"  # a less idle session needs the space
    CASCADE = "cascade"  # pushed down by a less idle session demoted into its tier
    PROMOTE = "promote"  # capacity allows a request (or an expected one) to run from HBM
    LOST = "lost"  # the off-GPU copy the books point at is gone (a restart, a bad block): recomputed
    RECOMPUTE = "recompute"  # the shared tier's link would deliver the copy later than a prefill rebuilds it


@dataclass(frozen=True, slots=True)
class Move:
    """Move a session's KV from ``src`` to ``dst``; ``tokens`` is its footprint at ``dst``.

    Moves in a plan are ordered: applying them in order never overfills a tier.
    A move to WAITING is a drop.
    """

    session_id: str
    src: Location
    dst: Location
    tokens: int
    reason: MoveReason

    @property
    def is_promotion(self) -> bool:
        return self.dst.tier < self.src.tier


@dataclass(frozen=True, slots=True)
class Admit:
    """The session's waiting request may run on ``replica``, reserving ``tokens`` of HBM."""

    session_id: str
    replica: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Gate:
    """The session's request stays held; the planner retries on the next event or tick."""

    session_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    """A closed session: free its KV wherever it is."""

    session_id: str
    location: Location


HELD_REASON = "waiting for GPU capacity"
CAPPED_REASON = "the tenant is at its GPU-tier share"  # auth.quotas gpu_share


@dataclass(frozen=True, slots=True)
class Plan:
    releases: tuple[Release, ...] = ()
    moves: tuple[Move, ...] = ()
    admits: tuple[Admit, ...] = ()
    tried: tuple[Gate, ...] = ()
    """Requests the plan tried to place, or found too large, and held."""
    waiting: tuple[str, ...] = ()
    """Every request that was gated when the plan was made. Those neither admitted nor
    in ``tried`` could not fit anywhere and were held without an attempt; their gates
    are built only when ``gates`` is read (a plan runs on every event; most of a
    backlog is these)."""
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def gates(self) -> tuple[Gate, ...]:
        """Every request the plan held, with why."""
        named = {gate.session_id for gate in self.tried} | {admit.session_id for admit in self.admits}
        return self.tried + tuple(Gate(s, HELD_REASON) for s in self.waiting if s not in named)

    def __bool__(self) -> bool:
        return bool(self.releases or self.moves or self.admits or self.gates)


class UnknownSession(LookupError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"unknown session {session_id!r}")
        self.session_id = session_id


class SourceLost(RuntimeError):
    """A move's source tier (DRAM or shared) no longer has the session's KV: a Redis or
    agent restart emptied it, or its blocks failed their checks. Retrying cannot help;
    the session is recomputed."""


class StaleDecision(RuntimeError):
    """A decision no longer matches the state it was planned on; plan again."""
