"""Simulated cluster policies behind one interface, registered by name.

Who calls what: the simulator owns the clock, the engines and the programs. It
calls ``open`` / ``request`` / ``finished`` / ``close`` on every session event and
``tick`` every ``TICK_S`` (and at the times a policy asked for with
``cluster.wake_at``); a policy answers by calling ``cluster.launch`` once per
request, when and where the request may run (at once, or later from a tick or
another event). A policy owns its tier accounting; the simulator never inspects it
except through ``occupancy``.

``lull`` and ``mori`` run the very policy core the live controller runs
(``ClusterState`` + ``TierPlanner``); the baselines in ``loadgen.sim.lru`` are
small models of the systems they name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from controller.policy import ClusterState, PlannerConfig, ReplicaSpec, Tier, TierPlanner
from controller.policy.types import Move
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


POLICIES: Registry[type[SimPolicy]] = Registry("simulator policy")


class CorePolicy(SimPolicy):
    """Drives ``ClusterState`` + ``TierPlanner`` the way the controller does: feed the
    event, plan, carry the plan out (bytes counted from each ``Move``, transfer times
    from the cost model), record it with ``state.apply``."""

    config = PlannerConfig()
    event_driven = True  # plan on every event; False: only on the tick

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster)
        specs = [ReplicaSpec(r, cluster.gpu_tokens, cluster.dram_tokens) for r in cluster.replicas]
        shared = cluster.shared_tokens if self.config.shared_tier else 0
        self.state = ClusterState(specs, shared)
        self.planner = TierPlanner(self.config)

    def open(self, sid: str, now: float) -> None:
        self.state.open_session(sid, now)

    def request(self, sid: str, now: float, call: CallSpec) -> None:
        self.state.request_arrived(sid, now, call.input_tokens, call.output_tokens)
        if self.event_driven:
            self._plan(now)

    def finished(self, sid: str, now: float, context_tokens: int) -> None:
        self.state.call_finished(sid, now, context_tokens)
        if self.event_driven:
            self._plan(now)

    def close(self, sid: str, now: float) -> None:
        self.state.close_session(sid, now)
        if self.event_driven:
            self._plan(now)

    def tick(self, now: float) -> None:
        self._plan(now)

    def occupancy(self) -> tuple[int, int, int]:
        totals = [0, 0, 0]
        for where, used in self.state.used.items():
            if where.tier is not Tier.WAITING:
                totals[where.tier] += used
        return totals[0], totals[1], totals[2]

    def _plan(self, now: float) -> None:
        plan = self.planner.plan(self.state, now)
        if not plan:
            return
        admitted = {a.session_id for a in plan.admits}
        # Where each admitted session's KV was before this plan moved it: that is
        # what the call waits on (a PCIe load, a network fetch, or a recompute).
        before = {sid: (self.state.sessions[sid].location, self.state.sessions[sid].context_tokens)
                  for sid in admitted}
        self.state.apply(plan, now)
        for move in plan.moves:
            self._count(move)
        cost = self.cluster.cost
        for admit in plan.admits:
            where, tokens = before[admit.session_id]
            transfer = 0.0
            if where.tier is Tier.DRAM:
                transfer = cost.kv_transfer_time(tokens, Link.PCIE)
            elif where.tier is Tier.SHARED:
                transfer = cost.kv_transfer_time(tokens, Link.NETWORK) + cost.kv_transfer_time(tokens, Link.PCIE)
            kept = 0 if where.tier is Tier.WAITING else tokens
            self.cluster.launch(admit.session_id, admit.replica, kept, transfer, now)

    def _count(self, move: Move) -> None:
        tiers = {move.src.tier, move.dst.tier}
        if Tier.WAITING in tiers:
            return  # a drop moves nothing; a promotion from nowhere is a recompute
        nbytes = self.cluster.cost.kv_bytes(move.tokens)
        counters = self.cluster.counters
        if Tier.GPU in tiers:
            counters.bytes_hbm_dram += nbytes  # GPU<->shared also crosses PCIe via DRAM
        if Tier.SHARED in tiers:
            counters.bytes_dram_shared += nbytes


@POLICIES.register("lull")
class LullPolicy(CorePolicy):
    """Lull (ARCHITECTURE.md "The policy, precisely"): MORI's idleness ranking over
    GPU / DRAM / shared tier / nowhere, planned on every event (a request is promoted
    at once when capacity allows; the 5 s tick is a backstop), with displacement and
    the cluster-wide shared tier. Default ``PlannerConfig``. Prefetch is on but never
    fires here: simulated clients do not report tool-call ends ahead of the request."""

    uses_shared_tier = True


@POLICIES.register("mori")
class MoriPolicy(CorePolicy):
    """MORI ("Idleness is Relative", 2026) as published: the same idleness ranking
    over HBM and host DRAM only (no shared tier: DRAM overflow drops KV), no prefetch,
    and decisions only on a periodic 5 s scheduling tick: an arriving request waits
    for the next tick to be admitted. It shares the planner's promotion rules with
    ``lull``: a waiting request may displace any GPU resident in a tool call, most
    idle first."""

    config = PlannerConfig(shared_tier=False, prefetch=False)
    event_driven = False

