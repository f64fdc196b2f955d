"""The live controller: a thin asyncio shell over the core's ``PlanDriver``.

Who calls what: the gateway calls ``admit`` once per request (it returns when the
request may run, on which replica, with which engine tier label) and reports the
call's end (``call_finished`` / ``call_failed``), tool-call hints and closures. Calls
of one session take turns (``turns``): a second call waits for the first to end. A
caller that goes away (its ``admit`` cancelled) withdraws its call, and a call admitted
just before gives its reservation back. Every event plans at once (policies that plan
only on the tick excepted); ``run`` is the backstop tick, which also closes sessions
idle longer than ``session_ttl_s``. The driver owns the books and the event -> plan ->
apply loop (the simulator runs the same one); here the ``Mover`` carries the bytes and admitted
callers are woken: a move is recorded only once the mover committed it, so a refused
or failed move leaves the session where it was, and the next plan tries again. KV is
booked in the engines' whole blocks (``block_tokens``).

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

from controller.policy import (
    POLICY_DEFINITIONS, ClusterState, Location, Phase, Plan, PlanDriver, Planner, PlannerConfig, Tier,
)
from controller.policy.idleness import DEFAULT_CYCLES
from controller.runtime.contracts import Admission, GateTimeout, Mover, SessionClosed  # noqa: F401 (re-exported)
from controller.runtime.mechanism import LiveMechanism, Waiter
from controller.runtime.metrics import gauge_sessions
from controller.runtime.restore import Placement, placements_from_reports
from controller.runtime.turns import WAITING_FOR_TURN, SessionTurns, TurnTimeout

log = logging.getLogger(__name__)
RECENT_WAITS_S = 5.0  # gate waits that count towards the autoscaler's signal after the request left the gate


class LiveController:
    def __init__(self, mover: Mover, *, policy: str = "lull", planner_config: PlannerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, idleness_window: int = DEFAULT_CYCLES,
                 metrics: dict | None = None, session_ttl_s: float = 0.0, block_tokens: int = 1) -> None:
        """``session_ttl_s``: close a session idle this long (no call running or waiting); 0: never.
        ``block_tokens``: the engines' KV block size. vLLM allocates whole blocks, so the books count
        whole blocks: in tokens, calls that fit the books could need more blocks than the engine has
        and wait inside it, admitted, for blocks that only a release frees."""
        if not session_ttl_s >= 0 or type(block_tokens) is not int or block_tokens < 1:
            raise ValueError(f"session_ttl_s must be >= 0 (0: sessions never expire) and block_tokens an "
                             f"integer >= 1, got {session_ttl_s!r} and {block_tokens!r}")
        self.policy_name, self.block_tokens = policy, block_tokens
        self.policy = POLICY_DEFINITIONS.get(policy)
        self.idleness_window, self.session_ttl_s = idleness_window, session_ttl_s
        self.driver = PlanDriver(self.policy, LiveMechanism(self), planner_config, k=idleness_window)
        self.mover, self.clock, self.metrics = mover, clock, metrics or {}
        self.nodes: dict[str, str] = {}  # replica -> Ray node
        self.capacity: dict[Location, int] = {Location(Tier.SHARED): 0}  # as configured, for status
        self.draining: set[str] = set()  # replicas being drained (runtime.drain), booked at zero capacity
        self._waiters: dict[str, Waiter] = {}
        self.turns = SessionTurns(self._busy)
        self.unreleased: dict[str, Location] = {}  # sessions the books forgot whose KV a failed release left
        self.moving: set[str] | None = None  # during a reconciliation (runtime.reconcile): sessions moved since it began
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
                    timeout_s: float, on_turn: Callable[[], None] | None = None) -> Admission:
        """Wait for the session's turn, then until its request may run from HBM; ``timeout_s``
        bounds both waits together. ``on_turn``: called as the turn comes, before the request
        enters the books. Cancelled, it withdraws the call (see the module docstring).
        Raises GateTimeout, SessionClosed, or ValueError for a request that can never run."""
        self._check_size(prompt_tokens, max_tokens)
        max_tokens = self.whole_blocks(prompt_tokens + max_tokens) - prompt_tokens  # reserve whole blocks
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await self.turns.take(session_id, timeout_s)
        except TurnTimeout:
            raise GateTimeout(session_id, timeout_s, WAITING_FOR_TURN) from None
        try:
            waiter, plan_now = self._enter(session_id, prompt_tokens, max_tokens, on_turn)
        except BaseException:
            self.turns.pass_on()  # the turn this call took goes to the next
            raise
        try:
            if plan_now:  # shielded: a caller that leaves must not cut a plan short between its moves
                await asyncio.shield(self.plan_step())
            await asyncio.wait({waiter.future}, timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            self._give_up(session_id, waiter, "cancelled")
            raise
        if not waiter.future.done():
            self._give_up(session_id, waiter, "timeout")
            raise GateTimeout(session_id, timeout_s, waiter.reason)
        return waiter.future.result()

    def _enter(self, session_id: str, prompt_tokens: int, max_tokens: int,
               on_turn: Callable[[], None] | None) -> tuple[Waiter, bool]:
        """The call's turn came: its request enters the books and waits at the gate."""
        record = self.state.sessions.get(session_id)
        if record is not None and record.closing:  # closed between its turn and now
            raise SessionClosed(f"session {session_id!r} was closed while its call waited for its turn")
        if on_turn is not None:
            on_turn()
        now = self.clock()
        if record is None:
            self.driver.open(session_id, now)
        plan_now = self.driver.request(session_id, now, prompt_tokens, max_tokens)
        waiter = self._waiters[session_id] = Waiter(asyncio.get_running_loop().create_future(), now)
        if not plan_now and not self.driver.admit_resident(session_id, now):
            waiter.reason = "waiting for the next planning tick"
        self._gauge_gated()
        return waiter, plan_now

    def _give_up(self, session_id: str, waiter: Waiter, outcome: str) -> None:
        if waiter.future.done():
            if not waiter.future.exception() and outcome == "cancelled":
                self.call_failed(session_id, started=False)  # admitted, but the call will never run
            return
        waiter.future.cancel()
        self._waiters.pop(session_id, None)
        plan_now = self.driver.withdrawn(session_id, self.clock())
        self._observe_wait(waiter, outcome)
        self._kick(plan_now)

    def _busy(self, session_id: str) -> bool:
        """A call of the session runs or waits at the gate, or the session is closing."""
        record = self.state.sessions.get(session_id)
        if session_id in self._waiters:
            return True
        return record is not None and (record.closing or record.phase is not Phase.TOOL)

    def whole_blocks(self, tokens: int) -> int:
        """``tokens`` of KV as the engine holds them: rounded up to whole blocks."""
        return -(-tokens // self.block_tokens) * self.block_tokens

    def _check_size(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        need = self.whole_blocks(prompt_tokens + max_tokens)
        largest = max((c for w, c in self.capacity.items() if w.tier is Tier.GPU), default=0)
        if need > largest and largest > 0:  # none at all (all died, or scaled to zero): wait for one
            raise ValueError(f"request needs {need} KV tokens (prompt + max_tokens); the largest replica "
                             f"holds {largest}: shorten the prompt or max_tokens")

    # -- session events ------------------------------------------------------------

    def call_finished(self, session_id: str, context_tokens: int) -> None:
        self._kick(self.driver.finished(session_id, self.clock(), self.whole_blocks(context_tokens)))

    def call_failed(self, session_id: str, started: bool = True) -> None:
        """The engine call failed: its KV is taken to be the prompt's. ``started`` False: the
        admitted call never reached the engine (its caller left), so its reservation is
        freed and the session keeps the KV it had before (``ClusterState.call_abandoned``)."""
        record = self.state.get(session_id)
        if record.phase is Phase.LLM and not started:
            plan_now = self.driver.abandoned(session_id, self.clock())
        elif record.phase is Phase.LLM:
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
        """Calls queued for their turn fail with SessionClosed, as does one gated (on the
        release); a call that arrives later waits for the release and opens it afresh."""
        plan_now = self.driver.close(session_id, self.clock())
        self.turns.fail(session_id, SessionClosed(f"session {session_id!r} was closed while its call waited"))
        self._kick(plan_now)

    def book_lost(self, session_id: str, where: Location) -> bool:
        """A reconciliation found the session's copy in ``where`` gone: recomputed from now
        (``PlanDriver.lost``), and its waiting request planned at once. True once booked."""
        booked = self.driver.lost(session_id, where)
        if booked:
            self._kick(self.policy.event_driven)
        return booked

    def expire_idle(self) -> list[str]:
        """Close the sessions idle longer than ``session_ttl_s`` (no call running, gated or
        queued); the next plan releases their KV from whatever tier holds it."""
        if not self.session_ttl_s:
            return []
        now = self.clock()
        expired = [s for s in self.state.idle_sessions(now, self.session_ttl_s) if not self.turns.holds(s)]
        plan_now = False
        for session_id in expired:
            plan_now |= self.driver.close(session_id, now)
        if expired:
            log.info("%d session(s) idle over %g s closed", len(expired), self.session_ttl_s)
            if "lull:sessions_expired" in self.metrics:
                self.metrics["lull:sessions_expired"].inc(len(expired))
        self._kick(plan_now)
        return expired

    # -- planning ---------------------------------------------------------------------

    async def run(self, tick_s: float) -> None:
        """The backstop tick every ``tick_s`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(tick_s)
            try:
                await self.tick()
            except Exception:  # a bad step must not stop the tick
                log.exception("planning step failed")

    async def tick(self) -> None:
        """Expire idle sessions, retry failed releases, plan once."""
        self.expire_idle()
        await self.retry_releases()
        await self.plan_step()

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
            if where.replica is not None and self._node(where) is None:  # the replica left: its drain took it
                del self.unreleased[session_id]
                continue
            if await self.release_copy(session_id, where):
                del self.unreleased[session_id]

    async def release_copy(self, session_id: str, where: Location) -> bool:
        """Drop a closed session's copy in ``where``; True once the drop committed. The mover
        answers False for one that did not (refused, an agent unreachable) or raises."""
        try:
            return bool(await self.mover.release(session_id, where, self._node(where)))
        except Exception as error:
            log.debug("release of %s in %s raised %s", session_id, where, type(error).__name__, exc_info=True)
            return False

    async def plan_step(self) -> Plan:
        """Plan once, carry out what the mover commits, record it, wake admitted waiters."""
        async with self._lock:
            started = time.perf_counter()
            plan = await self.driver.step(self.clock(), self.clock)
            for gate in plan.gates:
                if gate.session_id in self._waiters:
                    self._waiters[gate.session_id].reason = gate.reason
            self.turns.pass_on()  # sessions released by the plan are free for their next call
            self._gauge_gated()
            if "lull:plan_step_seconds" in self.metrics:
                self.metrics["lull:plan_step_seconds"].observe(time.perf_counter() - started)
            return plan

    def _node(self, where: Location) -> str | None:
        return self.nodes.get(where.replica) if where.replica is not None else None

    def _kick(self, plan_now: bool) -> None:
        """After an event: hand freed sessions their next call's turn, and plan soon (when the
        policy plans on this event): one background stepper, coalescing events."""
        self.turns.pass_on()
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
            self.driver.restore(place.session_id, place.where, self.whole_blocks(place.tokens), now)
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
        self.turns.check_integrity()
        for session_id, waiter in self._waiters.items():
            assert self.state.get(session_id).phase is Phase.GATED, f"{session_id} waits but is not gated"
            assert not waiter.future.done()

    def snapshot(self) -> dict:
        """Sessions and tiers for ``lull status``; plain data, safe to send anywhere."""
        now = self.clock()
        sessions = [self._entry(record, now) for record in self.state.sessions.values()]
        tiers = []
        for where, used in self.state.used.items():
            tiers.append(dict(tier=where.tier.name.lower(), replica=where.replica, node=self._node(where),
                              used_tokens=used, capacity_tokens=self.capacity.get(where),
                              sessions=len(self.state.residents[where])))
        return dict(policy=self.policy_name, sessions=sessions, tiers=tiers, gated=len(self._waiters),
                    queued=self.turns.queued(), session_ttl_s=self.session_ttl_s)

    def session_state(self, session_id: str) -> dict | None:
        """One session's entry of ``snapshot``, looked up by key (O(1) at any session count);
        None for a session the controller does not know."""
        record = self.state.sessions.get(session_id)
        return None if record is None else self._entry(record, self.clock())

    def _entry(self, record, now: float) -> dict:
        where = record.location
        return dict(session_id=record.session_id, tier=where.tier.name.lower(), replica=where.replica,
                    node=self._node(where), phase=record.phase.value, idleness=round(record.idleness(now), 4),
                    kv_tokens=record.context_tokens, footprint_tokens=record.footprint, closing=record.closing,
                    idle_s=round(now - record.active_at, 3))

    # -- metrics -------------------------------------------------------------------------

    def _gauge_gated(self) -> None:
        gauge_sessions(self.metrics, len(self._waiters), self.state.residents)

    def _observe_wait(self, waiter: Waiter, outcome: str) -> None:
        now = self.clock()
        self._recent_waits.append((now, now - waiter.arrived))
        if "lull:gate_wait_seconds" in self.metrics:
            self.metrics["lull:gate_wait_seconds"].labels(outcome=outcome).observe(now - waiter.arrived)
