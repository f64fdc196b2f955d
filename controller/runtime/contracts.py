"""What the live controller promises its callers (the gateway) and asks of its mover."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from controller.policy import Location, Move


@dataclass(frozen=True)
class Admission:
    replica_id: str
    tier_label: str  # the engine request's tier: "gpu" holds KV in HBM after the call
    waited_s: float  # gated time, on the controller's clock


class GateTimeout(TimeoutError):
    """A gated request was not admitted within its timeout; it was withdrawn."""

    def __init__(self, session_id: str, timeout_s: float, reason: str) -> None:
        super().__init__(f"session {session_id!r}: request held {timeout_s:g} s at the gate and not "
                         f"admitted ({reason}); retry later or raise gateway.gate_timeout_s")
        self.session_id, self.timeout_s, self.reason = session_id, timeout_s, reason

    def __reduce__(self):  # crosses Ray's process boundary intact
        return GateTimeout, (self.session_id, self.timeout_s, self.reason)


class SessionClosed(RuntimeError):
    """The session was closed while its request waited at the gate."""


class NotWrittenThrough(RuntimeError):
    """A GPU-tier session has no copy in its node's DRAM tier to demote (the agent's
    SOURCE_NOT_FOUND): its write-through is still on its way, or it was refused (a full
    tmpfs) and its KV is only in the engine, which no move copies. The controller retries
    for ``WRITE_THROUGH_GRACE_S`` after the session's last call, then recomputes it."""


class Mover(Protocol):
    """Carries out the controller's moves. Called by ``plan_step``, one move at a
    time, in plan order; never for a session in an LLM call. Returns True only once
    the move committed (the destination owns the KV); False leaves the source owner.
    Raises ``SourceLost`` when a DRAM or shared source no longer has the KV (the agent's
    SOURCE_NOT_FOUND): the driver then books the session as recomputed; ``NotWrittenThrough``
    when a GPU-tier source has no written-through copy.
    ``src_node`` / ``dst_node`` are the Ray nodes of per-replica ends, else None."""

    async def move(self, move: Move, src_node: str | None, dst_node: str | None) -> bool: ...

    async def release(self, session_id: str, where: Location, node: str | None) -> bool:
        """Free a closed session's KV in ``where``; True once the drop committed. A drop that
        did not (False, or an error) is kept and retried on every tick."""
        ...
