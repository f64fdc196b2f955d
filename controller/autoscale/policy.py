"""The autoscaling policy: how many engine replicas should run, and which one to
drain when there are too many. Pure and clock-injected, like Ray Serve's custom
autoscaling policies (``policy(ctx) -> (replicas, state)``): ``decide(snapshot,
state, settings)`` reads nothing but its arguments and returns a decision and the
next state, which the caller keeps and hands back on the next call.

Who calls: the controller, once per planning step (events or the backstop tick),
and the simulator; calling it twice with the same arguments returns the same
result. The caller owns acting on the decision: set the Serve deployment's replica
count, and drain the named replicas first (demote their sessions' KV to the shared
tier), which is the mechanism's part, not the policy's.

Rules, in order:

1. Bounds are hard. The target stays within [min, min(max, GPU capacity)]; a count
   outside them is brought back at once, whatever the cooldown or the gate says,
   because a replica above the GPU capacity cannot be placed and one above max is
   the operator's order. (If the GPU capacity is below min, the capacity wins.)
2. While replicas are starting or draining, hold: the signals do not show the
   change's effect yet. The up and down timers restart after the change settles.
3. Up (one replica) when sessions wait for GPU capacity, continuously for
   ``scale_up_window_s``: the p90 gate wait is over target x ratio, or the waiting
   set is non-empty, or the p90 TTFT is over its target.
4. Down (one replica) when the GPU tier stays underused for ``scale_down_window_s``:
   occupancy below ``scale_down_occupancy``, the other replicas could hold every
   GPU-tier token, nothing is gated and no up signal holds. The replica to drain is
   the one with the fewest GPU-tier tokens: its sessions are the cheapest to move.
5. Two changes are at least ``cooldown_s`` apart (rule 1 excepted).

With ``autoscaling.enabled`` false the policy holds the count as it is.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from proto.config_checks import ConfigError

if TYPE_CHECKING:
    from proto.config import LullConfig

__all__ = ["AutoscaleSettings", "Reason", "ReplicaLoad", "ScaleDecision", "ScalerState", "ScalingSnapshot", "decide"]


@dataclass(frozen=True)
class ReplicaLoad:
    """One running engine replica's GPU tier, in tokens."""

    name: str
    gpu_used_tokens: int
    gpu_capacity_tokens: int

    def __post_init__(self) -> None:
        if self.gpu_capacity_tokens <= 0 or not 0 <= self.gpu_used_tokens:
            raise ValueError(
                f"replica {self.name}: need gpu_capacity_tokens > 0 and gpu_used_tokens >= 0; "
                f"got {self.gpu_used_tokens}/{self.gpu_capacity_tokens}"
            )


@dataclass(frozen=True)
class ScalingSnapshot:
    """What the policy sees at ``now`` (seconds, the caller's clock)."""

    now: float
    running: tuple[ReplicaLoad, ...]
    starting: int = 0
    draining: int = 0
    gate_waits_s: tuple[float, ...] = ()  # how long each gated request has waited so far
    waiting_sessions: int = 0  # sessions whose KV is in no tier
    ttft_p90_s: float | None = None  # recent p90 TTFT; None: no recent requests
    gpu_replica_cap: int | None = None  # replicas the GPU nodes can hold; None: unknown

    def __post_init__(self) -> None:
        names = [r.name for r in self.running]
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique; got {names}")
        if min(self.starting, self.draining, self.waiting_sessions) < 0 or any(w < 0 for w in self.gate_waits_s):
            raise ValueError("starting, draining, waiting_sessions and gate waits must be >= 0")
        if self.gpu_replica_cap is not None and self.gpu_replica_cap < 0:
            raise ValueError(f"gpu_replica_cap must be >= 0; got {self.gpu_replica_cap}")

    @property
    def replicas(self) -> int:
        """Replicas that count towards the target: running and starting, not draining."""
        return len(self.running) + self.starting


@dataclass(frozen=True)
class AutoscaleSettings:
    """The ``replicas`` and ``autoscaling`` config sections, as the policy reads them."""

    min_replicas: int = 1
    max_replicas: int = 1
    enabled: bool = True
    target_gate_wait_s: float = 2.0
    scale_up_ratio: float = 1.5
    scale_down_occupancy: float = 0.5
    scale_up_window_s: float = 30.0
    scale_down_window_s: float = 300.0
    cooldown_s: float = 60.0
    target_ttft_p90_s: float | None = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"need 0 <= min_replicas <= max_replicas; got {self.min_replicas}, {self.max_replicas}")

    @classmethod
    def from_config(cls, config: LullConfig) -> AutoscaleSettings:
        a = config.autoscaling
        return cls(
            min_replicas=config.replicas.min, max_replicas=config.replicas.max, enabled=a.enabled,
            target_gate_wait_s=a.target_gate_wait_s, scale_up_ratio=a.scale_up_ratio,
            scale_down_occupancy=a.scale_down_occupancy, scale_up_window_s=a.scale_up_window_s,
            scale_down_window_s=a.scale_down_window_s, cooldown_s=a.cooldown_s,
            target_ttft_p90_s=a.target_ttft_p90_s,
        )


@dataclass(frozen=True)
class ScalerState:
    """What the policy remembers between calls; start with ``ScalerState()``."""

    up_since: float | None = None  # since when an up signal has held without a break
    down_since: float | None = None  # since when the GPU tier has been underused
    last_change_s: float | None = None


class Reason(enum.Enum):
    HOLD = "hold"
    DISABLED = "disabled"
    BELOW_MIN = "below-min"
    ABOVE_MAX = "above-max"  # max, or the GPU nodes' capacity
    SETTLING = "settling"  # replicas starting or draining
    COOLDOWN = "cooldown"
    AT_MAX = "at-max"
    AT_MIN = "at-min"
    GATE_WAIT = "gate-wait"
    WAITING_SET = "waiting-set"
    TTFT = "ttft"
    UNDERUSED = "underused"


@dataclass(frozen=True)
class ScaleDecision:
    target: int  # replicas wanted: running + starting, after this decision
    drain: tuple[str, ...]  # running replicas to drain first, cheapest to move first
    reason: Reason
    detail: str = ""

    @property
    def changes(self) -> bool:
        return self.reason in _CHANGES


_CHANGES = {Reason.BELOW_MIN, Reason.ABOVE_MAX, Reason.GATE_WAIT, Reason.WAITING_SET, Reason.TTFT, Reason.UNDERUSED}


def decide(snap: ScalingSnapshot, state: ScalerState, settings: AutoscaleSettings) -> tuple[ScaleDecision, ScalerState]:
    """The decision for ``snap`` and the state to pass next time. See the module's rules."""
    now, current = snap.now, snap.replicas
    if state.last_change_s is not None and now < state.last_change_s:
        raise ValueError(f"the clock ran backwards: now={now} < last change {state.last_change_s}")
    hi = settings.max_replicas if snap.gpu_replica_cap is None else min(settings.max_replicas, snap.gpu_replica_cap)
    lo = min(settings.min_replicas, hi)
    pressure = _pressure(snap, settings)
    underused = _underused(snap, settings) if not pressure and not snap.gate_waits_s else None
    settling = snap.starting > 0 or snap.draining > 0
    state = replace(
        state,
        up_since=None if settling or not pressure else _since(state.up_since, now),
        down_since=None if settling or underused is None else _since(state.down_since, now),
    )

    def hold(reason: Reason, detail: str = "") -> tuple[ScaleDecision, ScalerState]:
        return ScaleDecision(current, (), reason, detail), state

    def change(target: int, drain: tuple[str, ...], reason: Reason, detail: str) -> tuple[ScaleDecision, ScalerState]:
        return ScaleDecision(target, drain, reason, detail), ScalerState(last_change_s=now)

    if not settings.enabled:
        return hold(Reason.DISABLED)
    if current < lo:
        return change(lo, (), Reason.BELOW_MIN, f"{current} replicas < min {lo}")
    if current > hi:
        # Starting replicas go first (Serve stops those before running ones); then the cheapest running.
        excess = max(0, len(snap.running) - hi)
        return change(hi, _cheapest(snap.running, excess), Reason.ABOVE_MAX, f"{current} replicas > bound {hi}")
    if settling:
        return hold(Reason.SETTLING, f"{snap.starting} starting, {snap.draining} draining")
    cooling = state.last_change_s is not None and now - state.last_change_s < settings.cooldown_s
    if state.up_since is not None and now - state.up_since >= settings.scale_up_window_s:
        reason, detail = pressure[0]
        if current >= hi:
            return hold(Reason.AT_MAX, detail)
        return hold(Reason.COOLDOWN, detail) if cooling else change(current + 1, (), reason, detail)
    if state.down_since is not None and now - state.down_since >= settings.scale_down_window_s:
        assert underused is not None
        if current <= lo:
            return hold(Reason.AT_MIN, underused)
        if cooling:
            return hold(Reason.COOLDOWN, underused)
        return change(current - 1, _cheapest(snap.running, 1), Reason.UNDERUSED, underused)
    return hold(Reason.HOLD)


def _since(previous: float | None, now: float) -> float:
    return now if previous is None else previous


def _pressure(snap: ScalingSnapshot, s: AutoscaleSettings) -> list[tuple[Reason, str]]:
    """Signals that sessions wait for GPU capacity, strongest evidence first."""
    found = []
    if snap.gate_waits_s:
        p90, limit = _p90(snap.gate_waits_s), s.target_gate_wait_s * s.scale_up_ratio
        if p90 > limit:
            found.append((Reason.GATE_WAIT, f"p90 gate wait {p90:.1f} s > {limit:.1f} s ({len(snap.gate_waits_s)} gated)"))
    if snap.waiting_sessions:
        found.append((Reason.WAITING_SET, f"{snap.waiting_sessions} sessions in the waiting set"))
    if s.target_ttft_p90_s is not None and snap.ttft_p90_s is not None and snap.ttft_p90_s > s.target_ttft_p90_s:
        found.append((Reason.TTFT, f"p90 TTFT {snap.ttft_p90_s:.1f} s > {s.target_ttft_p90_s:.1f} s"))
    return found


def _underused(snap: ScalingSnapshot, s: AutoscaleSettings) -> str | None:
    """Why one replica fewer would do, or None. Besides low occupancy, the remaining
    replicas must hold every GPU-tier token, so the drain forces no demotion past
    the replica's own sessions and the next step does not scale straight back up."""
    if not snap.running:
        return None
    used = sum(r.gpu_used_tokens for r in snap.running)
    capacity = sum(r.gpu_capacity_tokens for r in snap.running)
    occupancy = used / capacity
    remaining = capacity - _by_cost(snap.running)[0].gpu_capacity_tokens
    if occupancy >= s.scale_down_occupancy or used > remaining:
        return None
    return f"GPU tier {occupancy:.0%} used < {s.scale_down_occupancy:.0%}"


def _by_cost(running: tuple[ReplicaLoad, ...]) -> list[ReplicaLoad]:
    return sorted(running, key=lambda r: (r.gpu_used_tokens, r.name))


def _cheapest(running: tuple[ReplicaLoad, ...], n: int) -> tuple[str, ...]:
    return tuple(r.name for r in _by_cost(running)[:n])


def _p90(values: tuple[float, ...]) -> float:
    """Nearest-rank p90: a value that was observed, never an interpolation."""
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]
