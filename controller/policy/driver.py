"""The one event -> plan -> apply loop, shared by the live controller and the simulator.

Who calls what: the owner (``LiveController``, or a simulated policy) feeds every
event with the time it happened. Each event method returns whether the policy's
definition plans on it now (``event_driven``; a tick always plans); the owner then
runs a step, at once or coalesced: ``await step(now)`` live, ``step_now(now)`` in the
simulator, whose mechanism completes at once. A step plans on the books and hands
each decision to the ``Mechanism`` in the plan's order (releases, moves, admits); a
decision is recorded in the books only once the mechanism carried it out, so a
refused or failed move leaves the session where it was and the next plan tries
again. Live, events may arrive while the mechanism awaits: every decision is
re-checked against the books before it is carried out, and a stale one is skipped.

Pure: no clock reads (time comes in with each event, and through ``clock`` when
carrying a plan out takes time), no I/O of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from controller.policy.idleness import DEFAULT_CYCLES
from controller.policy.planner import PlannerConfig
from controller.policy.policies import PolicyDefinition
from controller.policy.state import ClusterState
from controller.policy.types import (
    WAITING,
    Admit,
    Location,
    Move,
    MoveReason,
    Phase,
    Plan,
    Release,
    SourceLost,
    StaleDecision,
    Tier,
)

log = logging.getLogger(__name__)


class Mechanism(Protocol):
    """Carries a plan out. Called by ``PlanDriver.step``, one plan at a time, in order."""

    async def release(self, release: Release, free_kv: bool) -> None:
        """The closed session is gone from the books; ``free_kv``: it had KV in
        ``release.location`` and the policy moves KV, so free it there."""

    async def move(self, move: Move) -> bool:
        """Carry out a move that carries KV (the policy moves KV and the session has
        some); True once committed. Moves that carry nothing are only booked."""

    def admitted(self, admit: Admit, was: Location, kv_tokens: int, now: float) -> None:
        """The request may run on ``admit.replica`` now (booked). When the plan was
        made its KV, ``kv_tokens`` long, was in ``was``: what the call waits on."""


class PlanDriver:
    """Owns the books (``state``), the planner and the policy definition."""

    def __init__(self, definition: PolicyDefinition, mechanism: Mechanism,
                 planner_config: PlannerConfig | None = None, *, k: int = DEFAULT_CYCLES) -> None:
        self.definition = definition
        self.mechanism = mechanism
        self.planner = definition.make_planner(planner_config or PlannerConfig())
        self.state = ClusterState([], 0, k=k)

    # -- capacity (each returns whether to plan now) ----------------------------------

    def add_replica(self, replica_id: str, gpu_tokens: int, dram_tokens: int) -> bool:
        self.state.set_replica(self.definition.replica_spec(replica_id, gpu_tokens, dram_tokens))
        return self.definition.event_driven

    def remove_replica(self, replica_id: str, now: float) -> bool:
        self.state.remove_replica(replica_id, now)
        return self.definition.event_driven

    def set_shared_capacity(self, tokens: int) -> bool:
        self.state.set_shared_capacity(self.definition.shared_tokens(tokens))
        return self.definition.event_driven

    # -- session events (each returns whether to plan now) -----------------------------

    def open(self, session_id: str, now: float) -> None:
        """A session starts. Nothing to plan until its request arrives."""
        self.state.open_session(session_id, now)

    def request(self, session_id: str, now: float, prompt_tokens: int, max_tokens: int) -> bool:
        self.state.request_arrived(session_id, now, prompt_tokens, max_tokens)
        return self.definition.event_driven

    def admit_resident(self, session_id: str, now: float) -> bool:
        """Between plans (a policy not ``event_driven`` that ``admits_resident``): the
        session's request runs at once when its KV is in HBM and its growth fits there;
        moves nothing. The owner calls it after ``request``, once it can take the admit."""
        record = self.state.sessions[session_id]
        where = record.location
        if not self.definition.admits_resident or where.tier is not Tier.GPU or record.request is None:
            return False
        admit, kv_tokens = Admit(session_id, where.replica, record.request.need_tokens), record.context_tokens
        try:
            self.state.apply_admit(admit, now, was=where)
        except StaleDecision:
            return False  # it does not fit (or runs already): it waits for the plan
        self.mechanism.admitted(admit, where, kv_tokens, now)
        return True

    def withdrawn(self, session_id: str, now: float) -> bool:
        """The gated request will not run (timed out, cancelled, its replica died)."""
        self.state.request_withdrawn(session_id, now)
        return self.definition.event_driven

    def finished(self, session_id: str, now: float, context_tokens: int) -> bool:
        self.state.call_finished(session_id, now, context_tokens)
        return self.definition.event_driven

    def abandoned(self, session_id: str, now: float) -> bool:
        """The admitted call never reached the engine (its caller left)."""
        self.state.call_abandoned(session_id, now)
        return self.definition.event_driven

    def tool_started(self, session_id: str, now: float) -> bool:
        """A hint only: the gap since the last call already counts as tool time."""
        self.state.tool_call_started(session_id, now)
        return self.definition.event_driven

    def tool_finished(self, session_id: str, now: float) -> bool:
        self.state.tool_call_finished(session_id, now)
        return self.definition.event_driven

    def close(self, session_id: str, now: float) -> bool:
        self.state.close_session(session_id, now)
        return self.definition.event_driven

    def restore(self, session_id: str, where: Location, tokens: int, now: float) -> bool:
        """Re-enter a session whose KV a node agent reports in ``where`` (after a restart)."""
        self.state.restore_session(session_id, self.definition.booked_at(where), tokens, now)
        return self.definition.event_driven

    def lost(self, session_id: str, where: Location) -> bool:
        """The session's copy in ``where`` is gone (a reconciliation found it absent): it is
        booked as recomputed, as a move that found its source gone is. True once booked;
        False when the books no longer have it there, or its call runs."""
        record = self.state.sessions.get(session_id)
        if record is None or record.location != where or record.phase is Phase.LLM or where.tier is Tier.WAITING:
            return False
        self.state.apply_move(Move(session_id, where, WAITING, 0, MoveReason.LOST))
        return True

    def tick(self, now: float) -> bool:
        """The periodic backstop: every policy plans on it."""
        return True

    # -- planning ------------------------------------------------------------------------

    async def step(self, now: float, clock: Callable[[], float] | None = None) -> Plan:
        """Plan at ``now`` and carry the plan out; returns it (gates included).
        ``clock``: the time once the moves are done, when carrying them out takes
        time (live); admitted calls start then. None: at ``now``. When a move found its
        source's KV gone, the books drop it and plan once more at once: the request
        that waited on it runs now, recomputed, instead of retrying a copy that is gone."""
        plan, lost = await self._step_once(now, clock)
        if lost:
            plan, _ = await self._step_once(clock() if clock is not None else now, clock)
        return plan

    async def _step_once(self, now: float, clock: Callable[[], float] | None) -> tuple[Plan, bool]:
        plan = self.planner.plan(self.state, now)
        # Where each admitted session's KV was before this plan moved it: that is
        # what the call waits on (a PCIe load, a network fetch, or a recompute).
        before = {}
        for admit in plan.admits:
            record = self.state.sessions[admit.session_id]
            before[admit.session_id] = (record.location, record.context_tokens)
        for move in plan.moves:  # KV this plan dropped before admitting the call: it recomputes
            if move.dst.tier is Tier.WAITING and move.session_id in before:
                before[move.session_id] = (WAITING, before[move.session_id][1])
        for release in plan.releases:
            await self._release(release, now)
        lost = False
        for move in plan.moves:
            lost |= await self._move(move)
        if clock is not None:
            now = clock()
        for admit in plan.admits:
            try:
                self.state.apply_admit(admit, now, was=before[admit.session_id][0])
            except StaleDecision as stale:
                log.debug("admit skipped: %s", stale)
                continue
            self.mechanism.admitted(admit, *before[admit.session_id], now)
        return plan, lost

    def step_now(self, now: float) -> Plan:
        """``step`` for a mechanism whose calls complete at once (the simulator)."""
        return _run_at_once(self.step(now))

    async def _release(self, release: Release, now: float) -> None:
        record = self.state.sessions[release.session_id]
        has_kv = record.context_tokens > 0 and release.location.tier is not Tier.WAITING
        self.state.apply(Plan(releases=(release,)), now)
        await self.mechanism.release(release, has_kv and self.definition.moves_kv)

    async def _move(self, move: Move) -> bool:
        """Carry ``move`` out and book it; True when its source's KV was found gone (dropped)."""
        if not self._applicable(move):
            return False  # an earlier move of this plan failed, or events changed the books
        record = self.state.sessions[move.session_id]
        carries_kv = self.definition.moves_kv and move.src.tier is not Tier.WAITING and record.context_tokens > 0
        try:
            if carries_kv and not await self.mechanism.move(move):
                return False
        except SourceLost as lost:
            log.warning("%s's KV is gone from %s (%s); it will be recomputed", move.session_id, move.src, lost)
            if self._applicable(move):
                self.state.apply_move(Move(move.session_id, move.src, WAITING, 0, MoveReason.LOST))
            return True
        try:
            self.state.apply_move(move)
        except (StaleDecision, KeyError, ValueError) as stale:  # the books changed during the move
            log.warning("move of %s committed but not recorded (%s); reconcile from reports",
                        move.session_id, stale)
        return False

    def _applicable(self, move: Move) -> bool:
        record = self.state.sessions.get(move.session_id)
        if record is None or record.location != move.src or record.phase is Phase.LLM:
            return False
        if move.dst.tier is Tier.WAITING:
            return True
        return move.dst in self.state.capacity and move.tokens <= self.state.free(move.dst)


def _run_at_once(coroutine: Coroutine[Any, Any, Plan]) -> Plan:
    # A coroutine whose awaits all complete at once finishes on its first send; no
    # event loop is needed. One that suspends would need a loop: say so.
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("step_now needs a mechanism whose calls complete at once; await step() instead")
