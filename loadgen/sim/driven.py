"""The core's policies in the simulator: every name in ``POLICY_DEFINITIONS``,
simulated under that name with that very definition and the core's ``PlanDriver``,
the loop the live controller runs. What stays here is the mechanism: where the
controller moves KV (``lull``, ``mori``) its books are the tiers, and the simulator
counts each move's bytes and times each admitted call's KV load with the cost model;
where it moves none (``lru-offload``) the engine's own cache holds the KV, modelled
by ``loadgen.sim.lru``, and the driver decides only admission and placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from controller.policy import (
    POLICY_DEFINITIONS, Admit, Location, Mechanism, Move, PlanDriver, PolicyDefinition, Release, Tier,
)
from controller.policy.state import ClusterState
from loadgen.sim.cost_model import Link
from loadgen.sim.lru import LruPolicy
from loadgen.sim.policies import POLICIES, Cluster, SimPolicy
from loadgen.sim.workload import CallSpec


def _driver(definition: PolicyDefinition, mechanism: Mechanism, cluster: Cluster) -> PlanDriver:
    # The simulator plans with the default planner settings, as ``lull sim`` always has.
    driver = PlanDriver(definition, mechanism)
    for replica in cluster.replicas:
        driver.add_replica(replica, cluster.gpu_tokens, cluster.dram_tokens)
    driver.set_shared_capacity(cluster.shared_tokens)
    return driver


def _step_if(driver: PlanDriver, plan_now: bool, now: float) -> None:
    if plan_now:
        driver.step_now(now)


_HOPS = {  # the links a copy between two tiers crosses, in order
    frozenset((Tier.GPU, Tier.DRAM)): (Link.PCIE,),
    frozenset((Tier.DRAM, Tier.SHARED)): (Link.NETWORK,),
    frozenset((Tier.GPU, Tier.SHARED)): (Link.PCIE, Link.NETWORK),  # through the node's DRAM
}


class CorePolicy(SimPolicy):
    """A core policy that moves KV: the driver's books are the tiers. Bytes are
    counted from each ``Move``, transfer times come from the cost model."""

    def __init__(self, cluster: Cluster, definition: PolicyDefinition) -> None:
        super().__init__(cluster)
        self.driver = _driver(definition, self, cluster)
        self._now = 0.0  # the time of the event being planned on: moves book links then
        self._ready: dict[str, float] = {}  # session -> when its promotion's copy is in HBM
        self._link_tokens_per_s = cluster.network.bandwidth / cluster.cost.kv_bytes(1)
        self._recompute_s = lru_cache(maxsize=None)(cluster.cost.recompute_time)  # a pure function of tokens

    @property
    def state(self) -> ClusterState:
        return self.driver.state

    def _step_if(self, plan_now: bool, now: float) -> None:
        self._now = now
        if plan_now:  # the planner weighs the shared link's queue against gaps and recomputes
            self.state.report_shared_link(self.cluster.network.free_at, self._link_tokens_per_s, self._recompute_s)
        _step_if(self.driver, plan_now, now)

    def open(self, sid: str, now: float) -> None:
        self.driver.open(sid, now)

    def request(self, sid: str, now: float, call: CallSpec) -> None:
        # The books reserve what the live controller reserves: prompt + max_tokens.
        plan_now = self.driver.request(sid, now, call.input_tokens, call.reserve_tokens - call.input_tokens)
        self._step_if(plan_now, now)
        if not plan_now:
            self.driver.admit_resident(sid, now)

    def finished(self, sid: str, now: float, context_tokens: int) -> None:
        self._step_if(self.driver.finished(sid, now, context_tokens), now)

    def close(self, sid: str, now: float) -> None:
        self._ready.pop(sid, None)
        self._step_if(self.driver.close(sid, now), now)

    def tick(self, now: float) -> None:
        self._step_if(self.driver.tick(now), now)

    def occupancy(self) -> tuple[int, int, int]:
        totals = [0, 0, 0]
        for where, used in self.state.used.items():
            if where.tier is not Tier.WAITING:
                totals[where.tier] += used
        return totals[0], totals[1], totals[2]

    # -- the mechanism: instantaneous, its costs booked ------------------------------

    async def release(self, release: Release, free_kv: bool) -> None:
        """Freeing KV moves no bytes and takes no time."""

    async def move(self, move: Move) -> bool:
        """Book the copy on its links (a demotion too: it holds the link), count its
        bytes; a promotion's arrival in HBM is what an admitted call waits on."""
        if move.dst.tier is Tier.WAITING:
            return True  # a drop moves nothing
        nbytes = self.cluster.cost.kv_bytes(move.tokens)
        tiers = {move.src.tier, move.dst.tier}
        counters = self.cluster.counters
        if Tier.GPU in tiers:
            counters.bytes_hbm_dram += nbytes  # GPU<->shared also crosses PCIe via DRAM
        if Tier.SHARED in tiers:
            counters.bytes_dram_shared += nbytes
        hops = _HOPS[frozenset(tiers)]
        promotion = move.is_promotion
        replica = move.dst.replica if promotion else move.src.replica
        if replica is None:  # DRAM <-> shared: the node's own link
            replica = move.src.replica or move.dst.replica
        done = self.cluster.copy_done(move.tokens, replica, hops if not promotion else hops[::-1], self._now)
        if promotion and move.dst.tier is Tier.GPU:
            self._ready[move.session_id] = done
        return True

    def admitted(self, admit: Admit, was: Location, kv_tokens: int, now: float) -> None:
        ready = self._ready.pop(admit.session_id, now)
        kept = 0 if was.tier is Tier.WAITING else kv_tokens  # from nowhere: a recompute
        self.cluster.launch(admit.session_id, admit.replica, kept, max(0.0, ready - now), now)


class EngineCachePolicy(LruPolicy):
    """A core policy that moves no KV (``lru-offload``): the driver admits and places
    (its planner's sticky choice), the engine's LRU prefix cache holds the KV and, for
    requests admitted with the ``dram`` label, writes it through to DRAM (vLLM +
    LMCache "CPU offloading"): a request whose KV left HBM loads it back over PCIe.
    Requests queue in the engine, FCFS, until their blocks fit."""

    def __init__(self, cluster: Cluster, definition: PolicyDefinition) -> None:
        self.offload = definition.admitted_tier is Tier.DRAM
        super().__init__(cluster)
        self.driver = _driver(definition, self, cluster)
        self._calls: dict[str, CallSpec] = {}  # requests the driver has not admitted yet

    @property
    def state(self) -> ClusterState:
        return self.driver.state

    def open(self, sid: str, now: float) -> None:
        self.driver.open(sid, now)  # the replica is the planner's choice, on admission

    def request(self, sid: str, now: float, call: CallSpec) -> None:
        self._calls[sid] = call
        # The books reserve what the live controller reserves: prompt + max_tokens.
        _step_if(self.driver, self.driver.request(sid, now, call.input_tokens,
                                                  call.reserve_tokens - call.input_tokens), now)

    def finished(self, sid: str, now: float, context_tokens: int) -> None:
        super().finished(sid, now, context_tokens)
        _step_if(self.driver, self.driver.finished(sid, now, context_tokens), now)

    def close(self, sid: str, now: float) -> None:
        if sid in self.home:  # a session closed before its first admission never reached an engine
            super().close(sid, now)
        _step_if(self.driver, self.driver.close(sid, now), now)

    def tick(self, now: float) -> None:
        _step_if(self.driver, self.driver.tick(now), now)

    # -- the mechanism: the engine's queue and cache ----------------------------------

    async def release(self, release: Release, free_kv: bool) -> None:
        """The engine's cache forgot the session on ``close``."""

    async def move(self, move: Move) -> bool:
        raise AssertionError(f"{move}: a policy that moves no KV was asked to move some")

    def admitted(self, admit: Admit, was: Location, kv_tokens: int, now: float) -> None:
        replica = self.replicas[admit.replica]
        if admit.session_id not in self.home:
            self.home[admit.session_id] = replica
            replica.sessions += 1
        self._enqueue(replica, admit.session_id, self._calls.pop(admit.session_id), now)
        self._drain(replica, now)


@dataclass(frozen=True)
class Driven:
    """The registry entry of a core policy: its definition, and the mechanism that fits it."""

    definition: PolicyDefinition

    @property
    def uses_shared_tier(self) -> bool:
        return self.definition.shared_tier

    @property
    def uses_dram_tier(self) -> bool:
        return self.definition.moves_kv or self.definition.admitted_tier is Tier.DRAM

    def __call__(self, cluster: Cluster) -> SimPolicy:
        model = CorePolicy if self.definition.moves_kv else EngineCachePolicy
        return model(cluster, self.definition)


for _name in POLICY_DEFINITIONS.names():
    POLICIES.register(_name, Driven(POLICY_DEFINITIONS.get(_name)))
