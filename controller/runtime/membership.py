"""Replica membership, owned here alone: which engine replicas serve, on which Ray nodes, and
which node agents the controller reaches.

Who calls what, and why:
- An engine replica calls ``register`` once its engine is up (again after a controller
  restart, harmlessly): its node gets a KV agent first when it has none (a node that
  joined after launch), then the replica enters the books. Calling it again for a known
  replica changes its capacity.
- An engine replica calls ``deregister`` on its way out (Serve scaled it down or stops
  it): its sessions' KV is drained to the shared tier (``runtime.drain``), then it leaves
  the books. Every caller of one replica's drain awaits the same drain.
- The controller actor calls ``check`` every ``CHECK_S``, and ``lost`` when the gateway saw
  a call fail with its replica gone: a replica whose node is gone is removed at once (its
  node-local KV went with the node) and the node's agent forgotten; a replica whose actor
  is gone while its node lives is drained (its KV still sits in that node's DRAM). A KV
  agent that died while its node lives (killed mid-move, say) is started again: its DRAM
  tier outlives it on the node's tmpfs, and until it answers, moves of that node are not
  sent (the books keep each session where it was; the next plan tries again).
- A restarted controller calls ``restore`` before it rebuilds its books from the agents'
  reports: the replicas and agents it had, read back from the ``Store``, those still alive.

Plain asyncio: the cluster (`Cluster`) and the store (`Store`) are injected, Ray's in
``runtime.ray_cluster``, fakes in the unit tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from controller.runtime.drain import DrainReport, start_drain
from proto.names import node_agent_actor

log = logging.getLogger(__name__)
CHECK_S = 1.0  # how often the controller looks for replicas and nodes that died
DRAIN_TIMEOUT_S = 60.0  # a drain's deadline; the engine's graceful shutdown waits a little longer
KEEP_DRAIN_REPORTS = 100


@dataclass(frozen=True)
class Replica:
    """An engine replica as it registered."""

    replica_id: str  # the Serve replica's unique id: routing target and KV connector id
    node_id: str  # its Ray node, whose DRAM tier and agent it uses
    gpu_tokens: int  # KV tokens the controller books in its HBM
    dram_tokens: int  # ... in its node's DRAM tier
    actor_name: str  # its Ray actor's name (unique in the cluster): the controller tells it lives by it

    def __post_init__(self) -> None:
        for name in ("replica_id", "node_id", "actor_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if type(self.gpu_tokens) is not int or self.gpu_tokens < 1:
            raise ValueError(f"gpu_tokens must be an integer >= 1, got {self.gpu_tokens!r}")
        if type(self.dram_tokens) is not int or self.dram_tokens < 0:
            raise ValueError(f"dram_tokens must be an integer >= 0, got {self.dram_tokens!r}")


class Cluster(Protocol):
    """What membership asks of the cluster. Each may wait on the cluster's control store."""

    async def alive_nodes(self) -> set[str]: ...

    async def alive_actors(self) -> set[str]:
        """The names of the named actors that live, in every namespace."""
        ...

    async def start_agent(self, node_id: str) -> str:
        """Start (or find) the node's KV agent; its gRPC address."""
        ...


class Agents(Protocol):
    """The node agents the controller's mover reaches (``GrpcMover``)."""

    addresses: dict[str, str]

    def set_agent(self, node_id: str, address: str) -> None: ...

    def forget_agent(self, node_id: str) -> None: ...


class Store(Protocol):
    """Where membership outlives a controller restart (a dict of plain data)."""

    def load(self) -> dict | None: ...

    def save(self, data: dict) -> None: ...


class MemoryStore:
    """A `Store` in this process: an in-process controller has nothing to outlive."""

    def __init__(self) -> None:
        self.data: dict | None = None

    def load(self) -> dict | None:
        return self.data

    def save(self, data: dict) -> None:
        self.data = data


class Membership:
    def __init__(self, books: Callable, agents: Agents, cluster: Cluster, store: Store | None = None, *,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, on_change: Callable[[], None] = lambda: None) -> None:
        """``books()``: the current ``LiveController`` (a policy switch replaces it)."""
        self._books, self.agents, self.cluster = books, agents, cluster
        self.store = store or MemoryStore()
        self.drain_timeout_s, self.on_change = drain_timeout_s, on_change
        self.replicas: dict[str, Replica] = {}
        self._drains: dict[str, asyncio.Task] = {}  # replica -> its drain, shared by every caller
        self.drained: dict[str, DrainReport] = {}  # the latest drains, for late callers and status
        self._agent_starts: dict[str, asyncio.Task] = {}  # node -> the start of its agent

    # -- engines ------------------------------------------------------------------------

    async def register(self, replica: Replica) -> None:
        if replica.replica_id in self._drains:
            raise ValueError(f"replica {replica.replica_id!r} is draining; it cannot register again")
        await self._ensure_agent(replica.node_id)
        self._books().add_replica(replica.replica_id, replica.node_id, replica.gpu_tokens, replica.dram_tokens)
        known = replica.replica_id in self.replicas
        self.replicas[replica.replica_id] = replica
        self._changed()
        log.info("engine replica %s %s on node %s (%d GPU, %d DRAM tokens)", replica.replica_id,
                 "re-registered" if known else "registered", replica.node_id, replica.gpu_tokens,
                 replica.dram_tokens)

    async def deregister(self, replica_id: str) -> DrainReport | None:
        """Drain the replica, then forget it; its report, or None for a replica never registered."""
        if replica_id in self.drained and replica_id not in self._drains:
            return self.drained[replica_id]
        task = self._drain(replica_id)
        return None if task is None else await asyncio.shield(task)

    def _drain(self, replica_id: str) -> asyncio.Task | None:
        """Start the replica's drain (booked at zero capacity from now on), or find it running."""
        task = self._drains.get(replica_id)
        if task is not None or replica_id not in self._books().nodes:
            return task
        task = start_drain(self._books(), replica_id, timeout_s=self.drain_timeout_s)
        self._drains[replica_id] = task
        task.add_done_callback(lambda done: self._drain_done(replica_id, done))
        self.on_change()
        return task

    def _drain_done(self, replica_id: str, task: asyncio.Task) -> None:
        self._drains.pop(replica_id, None)
        self.replicas.pop(replica_id, None)
        self._changed()
        if not task.cancelled() and task.exception() is None:
            self.drained[replica_id] = task.result()
            while len(self.drained) > KEEP_DRAIN_REPORTS:
                self.drained.pop(next(iter(self.drained)))

    # -- deaths ---------------------------------------------------------------------------

    async def check(self) -> None:
        """Remove the replicas of dead nodes, forget those nodes' agents, start again the agents
        that died on living nodes, drain replicas that died."""
        nodes = await self.cluster.alive_nodes()
        if not nodes:  # the controller's own node lives: an empty answer is no answer
            raise RuntimeError("the cluster reported no alive node")
        for node_id in sorted(set(self.agents.addresses) - nodes):
            self.agents.forget_agent(node_id)
            log.warning("node %s is gone; its KV agent is forgotten", node_id)
            self._changed()
        for replica in [r for r in self.replicas.values() if r.node_id not in nodes]:
            log.warning("engine replica %s left with its node %s; its sessions' node-local KV is lost",
                        replica.replica_id, replica.node_id)
            self._remove(replica.replica_id)
        actors = await self.cluster.alive_actors()
        for node_id in sorted(n for n in self.agents.addresses if node_agent_actor(n) not in actors):
            log.warning("the KV agent of node %s is gone while its node lives; starting it again", node_id)
            self.agents.forget_agent(node_id)  # its old address answers nothing now
            self._changed()
        for node_id in sorted({r.node_id for r in self.replicas.values()} - set(self.agents.addresses)):
            if node_id not in self._agent_starts:  # a start that failed is tried again here
                asyncio.get_running_loop().create_task(self._restart_agent(node_id))
        for replica in list(self.replicas.values()):
            if replica.actor_name not in actors and replica.replica_id not in self._drains:
                log.warning("engine replica %s is gone while its node lives; draining its sessions",
                            replica.replica_id)
                self._drain(replica.replica_id)

    async def lost(self, replica_id: str, dead: bool) -> None:
        """A caller saw a call fail with ``replica_id`` gone: ``check`` now, before the call is
        retried. ``dead``: the caller was told it died (Ray's ActorDiedError), which Ray's
        tables may not show yet: it is drained at once (booked at zero: no retry goes there)."""
        await self.check()
        if dead and replica_id in self.replicas and replica_id not in self._drains:
            log.warning("engine replica %s died under a call; draining its sessions", replica_id)
            self._drain(replica_id)

    def _remove(self, replica_id: str) -> None:
        live = self._books()
        if replica_id in live.nodes:
            live.remove_replica(replica_id)
        self.replicas.pop(replica_id, None)
        self._changed()

    async def watch(self, period_s: float = CHECK_S) -> None:
        """``check`` every ``period_s`` until cancelled."""
        failing = False
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.check()
                failing = False
            except Exception as error:  # the GCS restarting: look again next time
                if not failing:
                    log.warning("membership check failed: %s", error)
                failing = True

    # -- node agents ------------------------------------------------------------------------

    async def _ensure_agent(self, node_id: str) -> None:
        """The node's agent, started first when the controller knows none (one start per node)."""
        if node_id in self.agents.addresses:
            return
        task = self._agent_starts.get(node_id)
        if task is None:
            task = self._agent_starts[node_id] = asyncio.get_running_loop().create_task(self._start_agent(node_id))
            task.add_done_callback(lambda _: self._agent_starts.pop(node_id, None))
        await asyncio.shield(task)

    async def _restart_agent(self, node_id: str) -> None:
        try:
            await self._ensure_agent(node_id)
        except Exception as error:  # the next check tries again
            log.warning("the KV agent of node %s did not start again: %s", node_id, error)

    async def _start_agent(self, node_id: str) -> None:
        address = await self.cluster.start_agent(node_id)
        self.agents.set_agent(node_id, address)
        self._changed()
        log.info("started the KV agent of node %s at %s", node_id, address)

    # -- restart ------------------------------------------------------------------------------

    async def restore(self) -> list[Replica]:
        """Read back the replicas and agents a previous controller had; keep those alive and
        put the replicas in the books. Returns the replicas restored."""
        saved = self.store.load() or {}
        nodes = await self.cluster.alive_nodes()
        actors = await self.cluster.alive_actors()
        for node_id, address in saved.get("agents", {}).items():
            if node_id in nodes and node_id not in self.agents.addresses:
                self.agents.set_agent(node_id, address)
        restored = []
        for fields in saved.get("replicas", []):
            replica = Replica(**fields)
            if replica.node_id in nodes and replica.actor_name in actors:
                self.replicas[replica.replica_id] = replica
                self._books().add_replica(replica.replica_id, replica.node_id, replica.gpu_tokens,
                                          replica.dram_tokens)
                restored.append(replica)
        self._changed()
        return restored

    def _changed(self) -> None:
        self.store.save({"replicas": [dataclasses.asdict(r) for r in self.replicas.values()],
                         "agents": dict(self.agents.addresses)})
        self.on_change()
