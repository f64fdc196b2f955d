"""A planner's tentative view: the cluster state plus the decisions made so far in
one plan. The planner decides step by step on this view (each move frees or takes
room the next decision sees) without touching the state, which stays the record of
what the mechanism has actually done.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from controller.policy.state import ClusterState, SessionRecord
from controller.policy.types import WAITING, Location, Move, MoveReason, Phase, Tier


class Overlay:
    def __init__(self, state: ClusterState, now: float) -> None:
        self._state = state
        self._now = now
        self._used = dict(state.used)
        self._placed: dict[str, tuple[Location, int]] = {}  # session -> (where, footprint)
        self._arrived: dict[Location, dict[str, None]] = {}  # ordered sets
        self._released: set[str] = set()
        self._admitted: set[str] = set()
        self._admitted_tokens: dict[Location, int] = {}  # HBM this plan's admits pinned, per GPU tier
        self._idleness: dict[str, float] = {}
        self.changes = 0  # bumped by every tentative decision
        self.link_free_at = state.shared_link_free_at  # with this plan's copies to and from the shared tier
        self.moves: list[Move] = []
        # Each location's demotion order, sorted once when first read and kept in order by
        # every later decision of the plan (a plan makes hundreds at scale: re-sorting a
        # replica's residents after each was a third of the planner's time).
        self._leaving: dict[Location, list[tuple[bool, float, str]]] = {}

    @property
    def state(self) -> ClusterState:
        """The books under the view, as they were when the plan began (read only)."""
        return self._state

    def record(self, session_id: str) -> SessionRecord:
        return self._state.sessions[session_id]

    def location(self, session_id: str) -> Location:
        placed = self._placed.get(session_id)
        return placed[0] if placed else self._state.sessions[session_id].location

    def footprint(self, session_id: str) -> int:
        placed = self._placed.get(session_id)
        return placed[1] if placed else self._state.sessions[session_id].footprint

    def free(self, where: Location) -> int:
        if where.tier is Tier.WAITING:
            return 10**18
        return self._state.capacity[where] - self._used[where]

    def idleness(self, session_id: str) -> float:
        iota = self._idleness.get(session_id)
        if iota is None:
            iota = self._state.sessions[session_id].idleness(self._now)
            self._idleness[session_id] = iota
        return iota

    def link_in_time(self, session_id: str, tokens: int) -> bool:
        """Whether a copy of ``tokens`` to the shared tier, behind what its link already
        carries, lands within the session's expected idle gap. The link is one resource
        for the whole cluster; demotions queued past the gaps they fill only delay every
        load behind them (at 64 simulated replicas the queue grew without bound and
        throughput fell to a tenth), so such a session is dropped and recomputed instead.
        Always True where the owner does not model the link."""
        rate = self._state.shared_link_tokens_per_s
        if rate is None:
            return True
        gap = self._state.sessions[session_id].history.expected_gap(self._now)
        return self._link_done_at(tokens, rate) - self._now <= gap

    def recompute_sooner(self, session_id: str) -> bool:
        """Whether a prefill would rebuild the session's KV before its copy from the shared
        tier, behind what the link already carries, would land. Promotions that queue
        behind a saturated link hold their HBM idle while they wait and delay every copy
        after them (at 64 simulated replicas the link was 99.5% busy and each plan
        re-weighed ~600 aged requests); such a session is recomputed instead. Always False
        where the owner models no link or no recompute time (live)."""
        rate, recompute_s = self._state.shared_link_tokens_per_s, self._state.recompute_s
        if rate is None or recompute_s is None:
            return False
        tokens = self._state.sessions[session_id].context_tokens
        return recompute_s(tokens) < self._link_done_at(tokens, rate) - self._now

    def _link_done_at(self, tokens: int, rate: float) -> float:
        """When a copy of ``tokens`` over the shared tier's link, behind what it already carries, ends."""
        return max(self._now, self.link_free_at) + tokens / rate

    def pinned(self, session_id: str) -> bool:
        """Running an LLM call, or admitted to run one in this plan."""
        record = self._state.sessions[session_id]
        return record.phase is Phase.LLM or session_id in self._admitted

    def room_bound(self, where: Location) -> int:
        """The most room displacement could make in ``where`` now: its capacity less what
        running calls (the books' pinned tokens) and this plan's admits hold, which never
        move. A need above it fails without a look at the residents."""
        return self._state.capacity[where] - self._state.index.pinned.get(where, 0) \
            - self._admitted_tokens.get(where, 0)

    def released(self, session_id: str) -> bool:
        return session_id in self._released

    def residents(self, where: Location) -> list[str]:
        members = [
            s
            for s in self._state.residents[where]
            if s not in self._placed and s not in self._released
        ]
        members.extend(s for s in self._arrived.get(where, ()) if self._placed[s][0] == where)
        return members

    def demotion_order(self, where: Location) -> list[tuple[bool, float, str]]:
        """The movable residents of ``where`` (not ``pinned``) in the order they should
        leave: sessions in a tool call before those waiting for HBM, most idle first inside
        each; entries (waiting for HBM, -ι, session id). Later decisions of this plan
        update the list in place: iterate a copy while deciding."""
        order = self._leaving.get(where)
        if order is None:
            order = sorted(self._leaving_key(s) for s in self.residents(where) if not self.pinned(s))
            self._leaving[where] = order
        return order

    def check(self) -> None:
        """Raise AssertionError unless every kept demotion order equals one sorted afresh
        and every room bound is its capacity less what its pinned residents hold."""
        for where, order in self._leaving.items():
            fresh = sorted(self._leaving_key(s) for s in self.residents(where) if not self.pinned(s))
            assert order == fresh, f"{where}: demotion order kept wrongly"
        for where, capacity in self._state.capacity.items():
            pinned = sum(self.footprint(s) for s in self.residents(where) if self.pinned(s))
            assert self.room_bound(where) == capacity - pinned, f"{where}: room bound wrong"

    def _leaving_key(self, session_id: str) -> tuple[bool, float, str]:
        return self._state.sessions[session_id].waiting_for_gpu, -self.idleness(session_id), session_id

    def _leave(self, where: Location, session_id: str) -> None:
        order = self._leaving.get(where)
        if order is not None:
            key = self._leaving_key(session_id)
            at = bisect_left(order, key)
            if at < len(order) and order[at] == key:
                del order[at]

    def move(self, session_id: str, dst: Location, tokens: int, reason: MoveReason) -> None:
        src = self.location(session_id)
        footprint = 0 if dst == WAITING else tokens
        self._used[src] -= self.footprint(session_id)
        self._used[dst] += footprint
        self._placed[session_id] = (dst, footprint)
        self._arrived.setdefault(dst, {})[session_id] = None
        self.changes += 1
        self._leave(src, session_id)
        if dst in self._leaving and not self.pinned(session_id):
            insort(self._leaving[dst], self._leaving_key(session_id))
        rate = self._state.shared_link_tokens_per_s
        if rate is not None and Tier.SHARED in (src.tier, dst.tier) and WAITING not in (src, dst):
            self.link_free_at = self._link_done_at(tokens, rate)
        self.moves.append(Move(session_id, src, dst, tokens, reason))

    def admit(self, session_id: str, replica: str, tokens: int) -> None:
        where = Location(Tier.GPU, replica)
        # A compacted context needs less than it holds; the room it gives back is
        # not offered to later decisions of this plan, because a plan records its
        # moves before its admits. The next plan sees it.
        held = max(tokens, self.footprint(session_id))
        self._used[where] += held - self.footprint(session_id)
        self._admitted_tokens[where] = self._admitted_tokens.get(where, 0) + held
        self._placed[session_id] = (where, held)
        self._arrived.setdefault(where, {})[session_id] = None
        self._admitted.add(session_id)
        self.changes += 1
        self._leave(where, session_id)

    def release(self, session_id: str) -> None:
        where = self.location(session_id)
        self._used[where] -= self.footprint(session_id)
        self._released.add(session_id)
        self.changes += 1
        self._leave(where, session_id)
