"""Simulated cluster policies behind one interface, registered by name.

Who calls what: the simulator owns the clock, the engines and the programs. It
calls ``open`` / ``request`` / ``finished`` / ``close`` on every session event and
``tick`` every ``TICK_S`` (and at the times a policy asked for with
``cluster.wake_at``); a policy answers by calling ``cluster.launch`` once per
request, when and where the request may run (at once, or later from a tick or
another event). A policy owns its tier accounting; the simulator never inspects it
except through ``occupancy``.

Every policy the core defines (``controller.policy.POLICY_DEFINITIONS``: ``lull``,
``mori``, ``lru-offload``) is simulated under its own name by ``loadgen.sim.driven``,
through the core's own ``PlanDriver`` and definition. The baselines in
``loadgen.sim.lru``, ``continuum`` and ``thunderagent`` are small models of systems
the core does not run; the registry refuses a second entry under a core name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from proto.registry import Registry
from loadgen.sim.cost_model import CostModel
from loadgen.sim.workload import CallSpec

TICK_S = 5.0  # the controller's backstop planning tick (ARCHITECTURE: "how a call flows")

# launch(session, replica, kv_tokens, transfer_s, now): the request may start on
# ``replica`` once ``transfer_s`` of KV transfer is done; ``kv_tokens`` of its previous
# KV (a prefix) survived in some tier; the rest of its reusable prefix is recomputed.
Launch = Callable[[str, str, int, float, float], None]


@dataclass
class Counters:
    bytes_hbm_dram: int = 0
    bytes_dram_shared: int = 0


@dataclass
class Cluster:
    """What a policy is given: the replicas, the tier capacities (KV tokens) and the
    simulator's hooks."""

    replicas: list[str]
    gpu_tokens: int  # per replica
    dram_tokens: int  # per replica
    shared_tokens: int  # cluster-wide
    cost: CostModel
    launch: Launch
    counters: Counters = field(default_factory=Counters)
    # wake_at(t): the simulator calls the policy's ``tick`` at t (a timer, e.g. a TTL).
    wake_at: Callable[[float], None] = lambda at: None


class SimPolicy:
    """Base class of a simulated policy. Subclasses register with ``POLICIES``."""

    uses_shared_tier = False  # True: the default shared capacity is 4x total GPU KV

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def open(self, sid: str, now: float) -> None:
        """A program starts a session."""

    def request(self, sid: str, now: float, call: CallSpec) -> None:
        """A request arrives; call ``cluster.launch`` for it now or later."""
        raise NotImplementedError

    def finished(self, sid: str, now: float, context_tokens: int) -> None:
        """The engine finished the session's call; its KV is ``context_tokens`` long."""
        raise NotImplementedError

    def close(self, sid: str, now: float) -> None:
        """The session ended (no call running): its KV may be freed."""

    def tick(self, now: float) -> None:
        """Every ``TICK_S`` seconds, and at the times asked for with ``cluster.wake_at``."""

    def occupancy(self) -> tuple[int, int, int]:
        """KV tokens held cluster-wide in (GPU, DRAM, shared), running calls included."""
        raise NotImplementedError


class SimModel(Protocol):
    """A registry entry: builds the policy for a cluster (a ``SimPolicy`` subclass is one)."""

    uses_shared_tier: bool

    def __call__(self, cluster: Cluster) -> SimPolicy: ...


POLICIES: Registry[SimModel] = Registry("simulator policy")
