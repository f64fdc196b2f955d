"""Baselines without an idleness ranking: prefix caching with LRU eviction.

No gating: a request goes straight to its replica's engine queue (sticky routing:
a session stays on the replica of its first call, chosen as the one with the fewest
sessions) and runs, FCFS, as soon as its new KV blocks fit in HBM after evicting
least-recently-used *idle* sessions' KV. Running calls are never preempted. The
queue is head-of-line blocking, as vLLM's waiting queue is without preemption.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from loadgen.sim.cost_model import Link
from loadgen.sim.policies import POLICIES, Cluster, SimPolicy
from loadgen.sim.workload import CallSpec


@dataclass
class LruReplica:
    name: str
    hbm_cap: int
    dram_cap: int
    hbm_used: int = 0  # idle cached KV + running reservations
    dram_used: int = 0
    idle: OrderedDict[str, int] = field(default_factory=OrderedDict)  # LRU first
    dram: OrderedDict[str, int] = field(default_factory=OrderedDict)  # LRU first
    running: dict[str, int] = field(default_factory=dict)  # reservation per session
    queue: deque[tuple[str, CallSpec]] = field(default_factory=deque)
    sessions: int = 0


class LruPolicy(SimPolicy):
    """Base of the LRU baselines; ``offload`` adds a write-through DRAM tier. The
    core's ``lru-offload`` runs on this engine model too (``loadgen.sim.driven``)."""

    offload = False
    unlimited = False
    uses_dram_tier = False  # the offloading subclasses set it with ``offload``

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster)
        big = 10**15
        self.replicas = {
            r: LruReplica(r, big if self.unlimited else cluster.gpu_tokens,
                        cluster.dram_tokens if self.offload else 0)
            for r in cluster.replicas
        }
        self.home: dict[str, LruReplica] = {}

    def open(self, sid: str, now: float) -> None:
        replica = min(self.replicas.values(), key=lambda r: (r.sessions, r.name))
        replica.sessions += 1
        self.home[sid] = replica

    def request(self, sid: str, now: float, call: CallSpec) -> None:
        replica = self.home[sid]
        self._enqueue(replica, sid, call, now)
        self._drain(replica, now)

    def finished(self, sid: str, now: float, context_tokens: int) -> None:
        replica = self.home[sid]
        replica.hbm_used -= replica.running.pop(sid)
        replica.hbm_used += context_tokens
        replica.idle[sid] = context_tokens  # most recently used: at the end
        if self.offload:
            self._write_through(replica, sid, context_tokens, now)
        self._drain(replica, now)

    def close(self, sid: str, now: float) -> None:
        replica = self.home.pop(sid)
        replica.sessions -= 1
        replica.hbm_used -= replica.idle.pop(sid, 0)
        replica.dram_used -= replica.dram.pop(sid, 0)
        self._drain(replica, now)

    def occupancy(self) -> tuple[int, int, int]:
        return (sum(r.hbm_used for r in self.replicas.values()),
                sum(r.dram_used for r in self.replicas.values()), 0)

    # -- hooks for the program-aware baselines built on this engine model --------

    def _enqueue(self, replica: LruReplica, sid: str, call: CallSpec, now: float) -> None:
        """Put a request in the engine's waiting queue: FCFS here."""
        replica.queue.append((sid, call))

    def _evictable(self, replica: LruReplica, sid: str, now: float) -> bool:
        """May the engine evict this idle session's cached KV now?"""
        return True

    def _started(self, replica: LruReplica, sid: str, now: float) -> None:
        """The engine took the session's request off its waiting queue."""

    # -- the engine ----------------------------------------------------------------

    def _drain(self, replica: LruReplica, now: float) -> None:
        while replica.queue:
            sid, call = replica.queue[0]
            cached = replica.idle.get(sid, 0)
            # The session's own cached KV becomes part of its reservation.
            grow = call.need_tokens - cached
            if not self._make_room(replica, grow, sid, now):
                return
            replica.queue.popleft()
            self._started(replica, sid, now)
            replica.idle.pop(sid, None)
            replica.hbm_used += grow
            replica.running[sid] = call.need_tokens
            transfer = 0.0
            stored = replica.dram.get(sid, 0)
            if stored > cached:  # load the part HBM lost back from DRAM
                replica.dram.move_to_end(sid)
                transfer = self.cluster.copy_done(stored - cached, replica.name, (Link.PCIE,), now) - now
                self.cluster.counters.bytes_hbm_dram += self.cluster.cost.kv_bytes(stored - cached)
                cached = stored
            self.cluster.launch(sid, replica.name, cached, transfer, now)

    def _make_room(self, replica: LruReplica, tokens: int, keep: str, now: float) -> bool:
        """Evict LRU idle sessions' KV (not ``keep``'s, only evictable ones) until
        ``tokens`` fit; all or nothing. vLLM frees a finished request's blocks tail
        first, so eviction eats the tail of the least recently used session and its
        prefix stays cached: the last victim keeps the prefix that was not needed."""
        free = replica.hbm_cap - replica.hbm_used
        if tokens <= free:
            return True
        victims = [sid for sid in replica.idle if sid != keep and self._evictable(replica, sid, now)]
        if free + sum(replica.idle[sid] for sid in victims) < tokens:
            return False
        for sid in victims:
            if free >= tokens:
                break
            take = min(replica.idle[sid], tokens - free)
            replica.idle[sid] -= take
            replica.hbm_used -= take
            free += take
            if replica.idle[sid] == 0:
                del replica.idle[sid]
        return True

    def _write_through(self, replica: LruReplica, sid: str, tokens: int, now: float) -> None:
        """Store the call's KV in DRAM (only the part not stored yet crosses PCIe, and
        keeps the link busy), evicting LRU sessions there; KV larger than the tier is
        not stored."""
        stored = replica.dram.pop(sid, 0)
        replica.dram_used -= stored
        if tokens > replica.dram_cap:
            return
        while replica.dram_used + tokens > replica.dram_cap:
            _, held = replica.dram.popitem(last=False)
            replica.dram_used -= held
        replica.dram[sid] = tokens
        replica.dram_used += tokens
        self.cluster.counters.bytes_hbm_dram += self.cluster.cost.kv_bytes(max(0, tokens - stored))
        if tokens > stored:
            self.cluster.copy_done(tokens - stored, replica.name, (Link.PCIE,), now)


@POLICIES.register("infinite-hbm")
class InfiniteHbm(LruPolicy):
    """A labelled reference, not a system and not a bound: HBM without a capacity limit, so
    every session's KV stays resident, nothing is recomputed and nothing waits for memory.
    Its schedule is still FCFS; the bound is computed (``loadgen.sim.limit``)."""

    unlimited = True
