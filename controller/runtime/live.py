"""The live controller: a thin asyncio shell over the core's ``PlanDriver``.

Who calls what: the gateway calls ``admit`` once per request (it returns when the
request may run, on which replica, with which engine tier label) and reports the
call's end (``call_finished`` / ``call_failed``), tool-call hints and closures. Every
event plans at once (policies that plan only on the tick excepted); ``run`` is the
backstop tick. The driver owns the books and the event -> plan -> apply loop (the
simulator runs the same one); here the ``Mover`` carries the bytes and admitted
callers are woken: a move is recorded only once the mover committed it, so a refused
or failed move leaves the session where it was, and the next plan tries again.

One event loop, no Ray, no clock of its own (``clock`` is injected). Plans run one at
a time under a lock; events that arrive while a plan awaits its moves are recorded at
once, and the driver re-checks each decision against the books before carrying it out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controller.policy import (
    POLICY_DEFINITIONS, Admit, ClusterState, Location, Move, Phase, Plan, PlanDriver, Planner, PlannerConfig, Release,
    Tier,
)
from controller.policy.idleness import DEFAULT_CYCLES
from controller.runtime.contracts import Admission, GateTimeout, Mover, SessionClosed  # noqa: F401 (re-exported)
from controller.runtime.restore import Placement, placements_from_reports

log = logging.getLogger(__name__)
RECENT_WAITS_S = 5.0  # gate waits that count towards the autoscaler's signal after the request left the gate


@dataclass
class _Waiter:
    future: asyncio.Future
    arrived: float
    reason: str = "waiting for GPU capacity"


class LiveController:
    def __init__(self, mover: Mover, *, policy: str = "lull", planner_config: PlannerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, idleness_window: int = DEFAULT_CYCLES,
                 metrics: dict | None = None) -> None:
        self.policy_name = policy
        self.policy = POLICY_DEFINITIONS.get(policy)
        self.idleness_window = idleness_window
        self.driver = PlanDriver(self.policy, _LiveMechanism(self), planner_config, k=idleness_window)
        self.mover, self.clock, self.metrics = mover, clock, metrics or {}
        self.nodes: dict[str, str] = {}  # replica -> Ray node
        self.capacity: dict[Location, int] = {Location(Tier.SHARED): 0}  # as configured, for status
        self.draining: set[str] = set()  # replicas being drained (runtime.drain), booked at zero capacity
        self._waiters: dict[str, _Waiter] = {}
        self.unreleased: dict[str, Location] = {}  # sessions the books forgot whose KV a failed release left
        self._recent_waits: deque[tuple[float, float]] = deque(maxlen=10_000)  # (left the gate at, waited)
        self._lock = asyncio.Lock()
        self._dirty = False
        self._stepper: asyncio.Task | None = None

    @property
    def state(self) -> ClusterState:
        """The books (the driver's): read them, feed events through the methods below."""
        return self.driver.state

    @property
    def planner(self) -> Planner:
        return self.driver.planner

    # -- capacity -----------------------------------------------------------------

    def add_replica(self, replica_id: str, node_id: str, gpu_tokens: int, dram_tokens: int) -> None:
        plan_now = self.driver.add_replica(replica_id, gpu_tokens, dram_tokens)
        self.nodes[replica_id] = node_id
        self.capacity[Location(Tier.GPU, replica_id)] = gpu_tokens
        self.capacity[Location(Tier.DRAM, replica_id)] = dram_tokens
        self._kick(plan_now)

    def remove_replica(self, replica_id: str) -> None:
        now = self.clock()
        plan_now = self.driver.remove_replica(replica_id, now)
        for tier in (Tier.GPU, Tier.DRAM):
            del self.capacity[Location(tier, replica_id)]
        del self.nodes[replica_id]
        # Calls that ran there are lost and their requests wait again in the books;
        # nobody waits for them here: the gateway sees its engine call fail.
        for session_id, record in self.state.sessions.items():
            if record.phase is Phase.GATED and session_id not in self._waiters:
                self.driver.withdrawn(session_id, now)
        self._kick(plan_now)

    def set_shared_capacity(self, tokens: int) -> None:
        plan_now = self.driver.set_shared_capacity(tokens)
        self.capacity[Location(Tier.SHARED)] = tokens
        self._kick(plan_now)

    # -- requests -------------------------------------------------------------------

    async def admit(self, session_id: str, tenant: str, prompt_tokens: int, max_tokens: int,
                    timeout_s: float) -> Admission:
        """Wait until the session's request may run from HBM; see the module docstring.
        Raises GateTimeout, SessionClosed, or ValueError for a request that cannot run."""
        self._check_size(prompt_tokens, max_tokens)
        if session_id in self._waiters:
            raise ValueError(f"session {session_id!r} already has a request waiting")
        now = self.clock()
        if session_id not in self.state.sessions:
            self.driver.open(session_id, now)
        plan_now = self.driver.request(session_id, now, prompt_tokens, max_tokens)
        waiter = self._waiters[session_id] = _Waiter(asyncio.get_running_loop().create_future(), now)
        if not plan_now:
            waiter.reason = "waiting for the next planning tick"
        self._gauge_gated()
        try:
            if plan_now:
                await self.plan_step()
            await asyncio.wait({waiter.future}, timeout=timeout_s)
        except asyncio.CancelledError:
            self._give_up(session_id, waiter, "cancelled")
            raise
        if not waiter.future.done():
            self._give_up(session_id, waiter, "timeout")
            raise GateTimeout(session_id, timeout_s, waiter.reason)
        return waiter.future.result()

    def _give_up(self, session_id: str, waiter: _Waiter, outcome: str) -> None:
        if waiter.future.done():
            if not waiter.future.exception() and outcome == "cancelled":
                self.call_failed(session_id)  # admitted, but the call will never run
            return
        waiter.future.cancel()
        self._waiters.pop(session_id, None)
        plan_now = self.driver.withdrawn(session_id, self.clock())
        self._observe_wait(waiter, outcome)
        self._kick(plan_now)

    def _check_size(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        need = prompt_tokens + max_tokens
        largest = max((c for w, c in self.capacity.items() if w.tier is Tier.GPU), default=0)
        if need > largest and largest > 0:  # none at all (all died, or scaled to zero): wait for one
            raise ValueError(f"request needs {need} KV tokens (prompt + max_tokens); the largest replica "
                             f"holds {largest}: shorten the prompt or max_tokens")

    # -- session events ------------------------------------------------------------

    def call_finished(self, session_id: str, context_tokens: int) -> None:
        self._kick(self.driver.finished(session_id, self.clock(), context_tokens))

    def call_failed(self, session_id: str) -> None:
        """The engine call failed (or never ran). Its KV is taken to be the prompt's."""
        record = self.state.get(session_id)
        if record.phase is Phase.LLM:
            plan_now = self.driver.finished(session_id, self.clock(), max(1, record.context_tokens))
        elif record.phase is Phase.GATED and session_id not in self._waiters:
            plan_now = self.driver.withdrawn(session_id, self.clock())
        else:
            raise ValueError(f"session {session_id!r} has no call running")
        self._kick(plan_now)

    def tool_call_started(self, session_id: str) -> None:
        """A hint only: the gap since the last call already counts as tool time."""
        self._kick(self.driver.tool_started(session_id, self.clock()))

    def tool_call_finished(self, session_id: str) -> None:
        self._kick(self.driver.tool_finished(session_id, self.clock()))

    def close_session(self, session_id: str) -> None:
        self._kick(self.driver.close(session_id, self.clock()))

    # -- planning ---------------------------------------------------------------------

    async def run(self, tick_s: float) -> None:
        """The backstop tick: a planning step every ``tick_s`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(tick_s)
            try:
                await self.retry_releases()
                await self.plan_step()
            except Exception:  # a bad step must not stop the tick
                log.exception("planning step failed")

    async def retry_releases(self) -> None:
        """Carry out the releases that failed (an agent restarting, a network blip). The books
        forgot those sessions already, and no tier drops a copy on its own (the planner is the
        only policy), so an unreleased copy would hold its tier's bytes for good. A session
        opened again under the same id since is booked anew: its old entry is dropped
        unreleased, since a drop now could take the new KV."""
        for session_id, where in list(self.unreleased.items()):
            if session_id in self.state.sessions:
                del self.unreleased[session_id]
                continue
            node = self._node(where)
            if where.replica is not None and node is None:  # the replica left: its drain or removal took it
                del self.unreleased[session_id]
                continue
            try:
                await self.mover.release(session_id, where, node)
            except Exception as error:
                log.warning("release of %s in %s failed again (%s)", session_id, where, type(error).__name__)
                continue
            del self.unreleased[session_id]

    async def plan_step(self) -> Plan:
        """Plan once, carry out what the mover commits, record it, wake admitted waiters."""
        async with self._lock:
            started = time.perf_counter()
            plan = await self.driver.step(self.clock(), self.clock)
            for gate in plan.gates:
                if gate.session_id in self._waiters:
                    self._waiters[gate.session_id].reason = gate.reason
            self._gauge_gated()
            if "lull:plan_step_seconds" in self.metrics:
                self.metrics["lull:plan_step_seconds"].observe(time.perf_counter() - started)
            return plan

    def _node(self, where: Location) -> str | None:
        return self.nodes.get(where.replica) if where.replica is not None else None

    def _kick(self, plan_now: bool) -> None:
        """Plan soon (when the policy plans on this event): one background stepper, coalescing events."""
        if not plan_now:
            return
        self._dirty = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (set-up code): the next admit or tick plans
        if self._stepper is None or self._stepper.done():
            self._stepper = loop.create_task(self._drain())

    async def quiesce(self) -> None:
        """Return once no event-triggered planning step is pending (shutdown, tests)."""
        while self._stepper is not None and not self._stepper.done():
            await asyncio.shield(self._stepper)

    async def _drain(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self.plan_step()
            except Exception:
                log.exception("planning step failed")

    # -- restart and status ---------------------------------------------------------

    def rebuild(self, reports: Iterable, *, bytes_per_token: int | None = None) -> list[Placement]:
        """Rebuild the books from the node agents' OccupancyReports (after a restart).
        Sessions come back where their KV is, as new sessions (idleness history is
        lost: ι = 0); sessions with no KV anywhere come back on their next request."""
        if self.state.sessions:
            raise RuntimeError("rebuild needs an empty controller (replicas added, no sessions)")
        now = self.clock()
        placements = placements_from_reports(reports, set(self.nodes), bytes_per_token)
        for place in placements:
            self.driver.restore(place.session_id, place.where, place.tokens, now)
        self._kick(self.policy.event_driven)
        return placements

    def gate_waits(self, horizon_s: float = RECENT_WAITS_S) -> list[float]:
        """The autoscaler's signal, s: how long each gated request has waited so far, and the
        waits of requests that left the gate in the last ``horizon_s`` (a queue that forms
        and drains between two looks at it is still a queue)."""
        now = self.clock()
        while self._recent_waits and now - self._recent_waits[0][0] > horizon_s:
            self._recent_waits.popleft()
        return [wait for _, wait in self._recent_waits] + [now - w.arrived for w in self._waiters.values()]

    def check_integrity(self) -> None:
        self.state.check_integrity()
        for session_id, waiter in self._waiters.items():
            assert self.state.get(session_id).phase is Phase.GATED, f"{session_id} waits but is not gated"
            assert not waiter.future.done()

    def snapshot(self) -> dict:
        """Sessions and tiers for ``lull status``; plain data, safe to send anywhere."""
        now = self.clock()
        sessions = []
        for record in self.state.sessions.values():
            where = record.location
            sessions.append(dict(
                session_id=record.session_id, tier=where.tier.name.lower(), replica=where.replica,
                node=self._node(where), phase=record.phase.value, idleness=round(record.idleness(now), 4),
                kv_tokens=record.context_tokens, footprint_tokens=record.footprint, closing=record.closing))
        tiers = []
        for where, used in self.state.used.items():
            tiers.append(dict(tier=where.tier.name.lower(), replica=where.replica, node=self._node(where),
                              used_tokens=used, capacity_tokens=self.capacity.get(where),
                              sessions=len(self.state.residents[where])))
        return dict(policy=self.policy_name, sessions=sessions, tiers=tiers, gated=len(self._waiters))

    # -- metrics -------------------------------------------------------------------------

    def _gauge_gated(self) -> None:
        if "lull:gated_requests" in self.metrics:
            self.metrics["lull:gated_requests"].set(len(self._waiters))
        if "lull:sessions" in self.metrics:
            counts = dict.fromkeys(Tier, 0)
            for where, members in self.state.residents.items():
                counts[where.tier] += len(members)
            for tier, count in counts.items():
                self.metrics["lull:sessions"].labels(tier=tier.name.lower()).set(count)

    def _observe_wait(self, waiter: _Waiter, outcome: str) -> None:
        now = self.clock()
        self._recent_waits.append((now, now - waiter.arrived))
        if "lull:gate_wait_seconds" in self.metrics:
            self.metrics["lull:gate_wait_seconds"].labels(outcome=outcome).observe(now - waiter.arrived)


class _LiveMechanism:
    """Carries the driver's plans out live: bytes through the controller's mover,
    admissions and closures to the callers waiting at the gate."""

    def __init__(self, live: LiveController) -> None:
        self.live = live

    async def release(self, release: Release, free_kv: bool) -> None:
        live, session_id = self.live, release.session_id
        waiter = live._waiters.pop(session_id, None)
        if waiter is not None:
            waiter.future.set_exception(SessionClosed(f"session {session_id!r} was closed while gated"))
            live._observe_wait(waiter, "closed")
        if free_kv:
            try:
                await live.mover.release(session_id, release.location, live._node(release.location))
            except Exception:  # the tiers never drop a copy on their own: retried on the tick
                log.exception("release of %s in %s failed; retried on the next tick", session_id, release.location)
                live.unreleased[session_id] = release.location

    async def move(self, move: Move) -> bool:
        live = self.live
        try:
            return bool(await live.mover.move(move, live._node(move.src), live._node(move.dst)))
        except Exception:
            log.exception("move of %s %s -> %s failed", move.session_id, move.src, move.dst)
            return False

    def admitted(self, admit: Admit, was: Location, kv_tokens: int, now: float) -> None:
        live = self.live
        waiter = live._waiters.pop(admit.session_id, None)
        if waiter is None:  # no one to run it (should not happen): give the room back
            live.call_failed(admit.session_id)
            return
        waiter.future.set_result(Admission(admit.replica, live.policy.tier_label, now - waiter.arrived))
        live._observe_wait(waiter, "admitted")
