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
from loadgen.sim.cost_model import CostModel, Link
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


class LinkQueue:
    """One link, one copy at a time, first come first served: a copy booked at ``now``
    starts when the link is free and takes ``bytes / bandwidth``. Demotions and write-
    throughs book it too, so they delay the loads behind them (HBM is freed at once:
    the source blocks are copied out of, not waited on, in this model)."""

    def __init__(self, bandwidth: float) -> None:
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        self.bandwidth = bandwidth
        self.free_at = 0.0
        self.busy_s = 0.0

    def book(self, nbytes: float, now: float) -> float:
        """Queue a copy of ``nbytes``; returns when it is done."""
        seconds = nbytes / self.bandwidth
        self.free_at = max(now, self.free_at) + seconds
        self.busy_s += seconds
        return self.free_at


@dataclass
class Cluster:
    """What a policy is given: the replicas, the tier capacities (KV tokens), the links
    and the simulator's hooks. Each replica has its own PCIe link (HBM <-> its node's
    DRAM); the shared tier is one server, so its network link is one, cluster-wide."""

    replicas: list[str]
    gpu_tokens: int  # per replica
    dram_tokens: int  # per replica
    shared_tokens: int  # cluster-wide
    cost: CostModel
    launch: Launch
    counters: Counters = field(default_factory=Counters)
    # wake_at(t): the simulator calls the policy's ``tick`` at t (a timer, e.g. a TTL).
    wake_at: Callable[[float], None] = lambda at: None
    pcie: dict[str, LinkQueue] = field(init=False)
    network: LinkQueue = field(init=False)

    def __post_init__(self) -> None:
        self.pcie = {r: LinkQueue(self.cost.link_bandwidth(Link.PCIE)) for r in self.replicas}
        self.network = LinkQueue(self.cost.link_bandwidth(Link.NETWORK))

    def copy_done(self, tokens: int, replica: str | None, hops: tuple[Link, ...], now: float) -> float:
        """Book a copy of ``tokens`` of KV over ``hops`` in order (each starts when the
        previous one is done); returns when the last is done."""
        nbytes = self.cost.kv_bytes(tokens)
        done = now
        for hop in hops:
            done = (self.pcie[replica] if hop is Link.PCIE else self.network).book(nbytes, done)
        return done


class SimPolicy:
    """Base class of a simulated policy. Subclasses register with ``POLICIES``."""

    uses_shared_tier = False  # True: the default shared capacity is 4x total GPU KV
    uses_dram_tier = True  # False: no off-GPU tier at all (equal memory does not apply)

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
    uses_dram_tier: bool

    def __call__(self, cluster: Cluster) -> SimPolicy: ...


POLICIES: Registry[SimModel] = Registry("simulator policy")
