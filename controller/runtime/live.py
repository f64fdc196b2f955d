"""The live controller: a thin asyncio shell over ``ClusterState`` + a planner.

Who calls what: the gateway calls ``admit`` once per request (it returns when the
request may run, on which replica, with which engine tier label) and reports the
call's end (``call_finished`` / ``call_failed``), tool-call hints and closures. Every
event plans at once (policies that plan only on the tick excepted); ``run`` is the
backstop tick. The controller owns the books; the ``Mover`` owns the bytes: a move is
recorded only once the mover committed it, so a refused or failed move leaves the
session where it was, and the next plan tries again.

One event loop, no Ray, no clock of its own (``clock`` is injected). Plans run one at
a time under a lock; events that arrive while a plan awaits its moves are recorded at
once, and each decision is re-checked against the books before it is carried out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controller.policy import (
    ClusterState, Location, Move, Phase, Plan, PlannerConfig, Release, ReplicaSpec, StaleDecision, Tier,
)
from controller.policy.idleness import DEFAULT_CYCLES
from controller.runtime.contracts import Admission, GateTimeout, Mover, SessionClosed  # noqa: F401 (re-exported)
from controller.runtime.policies import LIVE_POLICIES, UNBOUNDED_TOKENS
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
        self.policy = LIVE_POLICIES.get(policy)
        self.planner = self.policy.make_planner(planner_config or PlannerConfig())
        self.mover, self.clock, self.metrics = mover, clock, metrics or {}
        self.state = ClusterState([], 0, k=idleness_window)
        self.nodes: dict[str, str] = {}  # replica -> Ray node
        self.capacity: dict[Location, int] = {Location(Tier.SHARED): 0}  # as configured, for status
        self.draining: set[str] = set()  # replicas being drained (runtime.drain), booked at zero capacity
        self._waiters: dict[str, _Waiter] = {}
        self._recent_waits: deque[tuple[float, float]] = deque(maxlen=10_000)  # (left the gate at, waited)
        self._lock = asyncio.Lock()
        self._dirty = False
        self._stepper: asyncio.Task | None = None

    # -- capacity -----------------------------------------------------------------

    def add_replica(self, replica_id: str, node_id: str, gpu_tokens: int, dram_tokens: int) -> None:
        gpu = UNBOUNDED_TOKENS if self.policy.unbounded_gpu else gpu_tokens
        self.state.set_replica(ReplicaSpec(replica_id, gpu, dram_tokens if self.policy.moves_kv else 0))
        self.nodes[replica_id] = node_id
        self.capacity[Location(Tier.GPU, replica_id)] = gpu_tokens
        self.capacity[Location(Tier.DRAM, replica_id)] = dram_tokens
        self._kick()

    def remove_replica(self, replica_id: str) -> None:
        now = self.clock()
        self.state.remove_replica(replica_id, now)
        for tier in (Tier.GPU, Tier.DRAM):
            del self.capacity[Location(tier, replica_id)]
        del self.nodes[replica_id]
        # Calls that ran there are lost and their requests wait again in the books;
        # nobody waits for them here: the gateway sees its engine call fail.
        for session_id, record in self.state.sessions.items():
            if record.phase is Phase.GATED and session_id not in self._waiters:
                self.state.request_withdrawn(session_id, now)
        self._kick()

    def set_shared_capacity(self, tokens: int) -> None:
        self.state.set_shared_capacity(tokens if self.policy.shared_tier else 0)
        self.capacity[Location(Tier.SHARED)] = tokens
        self._kick()

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
            self.state.open_session(session_id, now)
        self.state.request_arrived(session_id, now, prompt_tokens, max_tokens)
        waiter = self._waiters[session_id] = _Waiter(asyncio.get_running_loop().create_future(), now)
        if not self.policy.event_driven:
            waiter.reason = "waiting for the next planning tick"
        self._gauge_gated()
        try:
            if self.policy.event_driven:
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
        self.state.request_withdrawn(session_id, self.clock())
        self._observe_wait(waiter, outcome)
        self._kick()

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
        self.state.call_finished(session_id, self.clock(), context_tokens)
        self._kick()

    def call_failed(self, session_id: str) -> None:
        """The engine call failed (or never ran). Its KV is taken to be the prompt's."""
        record = self.state.get(session_id)
        if record.phase is Phase.LLM:
            self.state.call_finished(session_id, self.clock(), max(1, record.context_tokens))
        elif record.phase is Phase.GATED and session_id not in self._waiters:
            self.state.request_withdrawn(session_id, self.clock())
        else:
            raise ValueError(f"session {session_id!r} has no call running")
        self._kick()

    def tool_call_started(self, session_id: str) -> None:
        """A hint only: the gap since the last call already counts as tool time."""
        self.state.get(session_id)
        self._kick()

    def tool_call_finished(self, session_id: str) -> None:
        self.state.tool_call_finished(session_id, self.clock())
        self._kick()

    def close_session(self, session_id: str) -> None:
        self.state.close_session(session_id, self.clock())
        self._kick()

    # -- planning ---------------------------------------------------------------------

    async def run(self, tick_s: float) -> None:
        """The backstop tick: a planning step every ``tick_s`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(tick_s)
            try:
                await self.plan_step()
            except Exception:  # a bad step must not stop the tick
                log.exception("planning step failed")

    async def plan_step(self) -> Plan:
        """Plan once, carry out what the mover commits, record it, wake admitted waiters."""
        async with self._lock:
            started = time.perf_counter()
            now = self.clock()
            plan = self.planner.plan(self.state, now)
            for release in plan.releases:
                await self._release(release.session_id, release.location, now)
            for move in plan.moves:
                await self._move(move)
            now = self.clock()
            for admit in plan.admits:
                waiter = self._waiters.get(admit.session_id)
                try:
                    self.state.apply_admit(admit, now)
                except StaleDecision as stale:
                    log.debug("admit skipped: %s", stale)
                    continue
                if waiter is None:  # no one to run it (should not happen): give the room back
                    self.call_failed(admit.session_id)
                    continue
                del self._waiters[admit.session_id]
                waiter.future.set_result(Admission(admit.replica, self.policy.tier_label, now - waiter.arrived))
                self._observe_wait(waiter, "admitted")
            for gate in plan.gates:
                if gate.session_id in self._waiters:
                    self._waiters[gate.session_id].reason = gate.reason
            self._gauge_gated()
            if "lull:plan_step_seconds" in self.metrics:
                self.metrics["lull:plan_step_seconds"].observe(time.perf_counter() - started)
            return plan

    async def _move(self, move: Move) -> None:
        if not self._applicable(move):
            return  # an earlier move of this plan failed, or events changed the books
        record = self.state.sessions[move.session_id]
        needs_bytes = self.policy.moves_kv and move.src.tier is not Tier.WAITING and record.context_tokens > 0
        if needs_bytes:
            try:
                done = await self.mover.move(move, self._node(move.src), self._node(move.dst))
            except Exception:
                log.exception("move of %s %s -> %s failed", move.session_id, move.src, move.dst)
                done = False
            if not done:
                return
        try:
            self.state.apply_move(move)
        except (StaleDecision, KeyError, ValueError) as stale:  # the books changed during the move
            log.warning("move of %s committed but not recorded (%s); reconcile from reports",
                        move.session_id, stale)

    def _applicable(self, move: Move) -> bool:
        record = self.state.sessions.get(move.session_id)
        if record is None or record.location != move.src or record.phase is Phase.LLM:
            return False
        if move.dst.tier is Tier.WAITING:
            return True
        return move.dst in self.state.capacity and move.tokens <= self.state.free(move.dst)

    async def _release(self, session_id: str, where: Location, now: float) -> None:
        record = self.state.sessions[session_id]
        has_kv = record.context_tokens > 0 and where.tier is not Tier.WAITING
        self.state.apply(Plan(releases=(Release(session_id, where),)), now)
        waiter = self._waiters.pop(session_id, None)
        if waiter is not None:
            waiter.future.set_exception(SessionClosed(f"session {session_id!r} was closed while gated"))
            self._observe_wait(waiter, "closed")
        if has_kv and self.policy.moves_kv:
            try:
                await self.mover.release(session_id, where, self._node(where))
            except Exception:  # garbage the tiers' own capacity limits evict later
                log.exception("release of %s in %s failed", session_id, where)

    def _node(self, where: Location) -> str | None:
        return self.nodes.get(where.replica) if where.replica is not None else None

    def _kick(self) -> None:
        """Plan soon (event-driven policies): one background stepper, coalescing events."""
        if not self.policy.event_driven:
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
            where = place.where
            if not self.policy.moves_kv and where.replica is not None:
                where = Location(Tier.GPU, where.replica)  # lru-offload books every session on its replica
            elif where.tier is Tier.SHARED and not self.policy.shared_tier:
                where = Location(Tier.WAITING)
            self.state.restore_session(place.session_id, where, place.tokens, now)
        self._kick()
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
