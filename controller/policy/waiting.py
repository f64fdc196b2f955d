"""What wants the planner's attention, indexed so that a plan costs what changed, not
the size of the backlog.

Under load most of the sessions in ``ClusterState.attention`` are gated requests that
cannot fit anywhere yet, and a plan runs on every event: walking all of them on every
plan made planning quadratic in the cluster's size (a simulated 64-replica hour took
14.5 min, 97% of it in that walk). ``ClusterState`` keeps this index beside its books:
each mutation marks its session dirty, and ``refresh`` (called by the planner before it
reads) re-files only the dirty ones. The index answers, in the planner's own terms:

- which gated requests pass ``may_fit``: each is filed under the GPU
  tier it may use (its own, from HBM or its node's DRAM; ``None``: any) with the
  threshold that tier's room bound must reach (its growth in place, or its need);
- which have waited since a time (the aged ones), in arrival order;
- which need more than a size (too large for every replica, after a capacity cut);
- the tokens pinned in each GPU tier by running calls, and so each tier's room bound;
- the rest of the attention set (closing sessions, prefetches), which is small.

Who calls: ``ClusterState`` calls ``touch`` on every change to a session; the planner
calls ``refresh`` and then the queries. ``check`` rebuilds it from the books and compares.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from typing import TYPE_CHECKING

from controller.policy.types import Location, Phase, Tier

if TYPE_CHECKING:
    from controller.policy.overlay import Overlay
    from controller.policy.state import ClusterState, SessionRecord

_AFTER = float("inf")  # sorts after every (value, seq) with that value


class AttentionIndex:
    def __init__(self) -> None:
        self._dirty: set[str] = set()
        # A gated request: its scope (a GPU tier, or None: any) and its three sorted entries.
        self._filed: dict[str, tuple[Location | None, tuple, tuple, tuple]] = {}
        self._scopes: dict[Location | None, list[tuple[int, int, str]]] = {}  # (threshold, seq, sid)
        self._arrivals: list[tuple[float, int, str]] = []  # (arrived_at, seq, sid)
        self._needs: list[tuple[int, int, str]] = []  # (need, seq, sid)
        self.others: dict[str, int] = {}  # attention members that are not gated requests -> seq
        self._pins: dict[str, tuple[Location, int]] = {}
        self.pinned: dict[Location, int] = {}  # GPU tier -> tokens held by running calls

    def touch(self, session_id: str) -> None:
        self._dirty.add(session_id)

    def refresh(self, state: ClusterState) -> None:
        for session_id in self._dirty:
            self._unfile(session_id)
            record = state.sessions.get(session_id)
            if record is None:
                continue
            if record.phase is Phase.LLM and record.footprint:
                self._pins[session_id] = (record.location, record.footprint)
                self.pinned[record.location] = self.pinned.get(record.location, 0) + record.footprint
            seq = state.attention.get(session_id)
            if seq is None:
                continue
            if record.request is None or record.closing or record.phase is not Phase.GATED:
                self.others[session_id] = seq
            else:
                self._file(record, seq)
        self._dirty.clear()

    def _file(self, record: SessionRecord, seq: int) -> None:
        sid, here, need = record.session_id, record.location, record.request.need_tokens
        if here.tier is Tier.GPU:
            scope, threshold = here, need - record.footprint
        elif here.tier is Tier.DRAM:
            scope, threshold = Location(Tier.GPU, here.replica), need
        else:
            scope, threshold = None, need
        entries = ((threshold, seq, sid), (record.request.arrived_at, seq, sid), (need, seq, sid))
        self._filed[sid] = (scope, *entries)
        for sorted_list, entry in zip((self._scopes.setdefault(scope, []), self._arrivals, self._needs), entries):
            insort(sorted_list, entry)

    def _unfile(self, session_id: str) -> None:
        self.others.pop(session_id, None)
        pin = self._pins.pop(session_id, None)
        if pin is not None:
            self.pinned[pin[0]] -= pin[1]
        filed = self._filed.pop(session_id, None)
        if filed is None:
            return
        scope, *entries = filed
        for sorted_list, entry in zip((self._scopes[scope], self._arrivals, self._needs), entries):
            del sorted_list[bisect_right(sorted_list, entry) - 1]

    # -- queries (after ``refresh``) ------------------------------------------------------

    def room_bounds(self, state: ClusterState) -> dict[Location, int]:
        """The most HBM each GPU tier could offer in a plan: its capacity less what
        displacement cannot move (sessions in an LLM call; a session wanting HBM may be
        displaced by a less idle request, see ``TierPlanner._room``). Promotion only
        lowers it: an admit pins what it takes, and a displacement frees exactly what it
        moves out. So a need above it fails for the whole plan. (Releases and overflow
        moves, made before it is read, never touch a pinned session.)"""
        bounds = {}
        for replica in state.replicas:
            where = Location(Tier.GPU, replica)
            bounds[where] = state.capacity[where] - self.pinned.get(where, 0)
        return bounds

    def gated(self) -> tuple[str, ...]:
        """Every gated request, in no particular order."""
        return tuple(self._filed)

    def fitting(self, scope: Location | None, bound: int) -> list[tuple[int, int, str]]:
        """Requests filed under ``scope`` whose threshold is at most ``bound``."""
        entries = self._scopes.get(scope, ())
        return entries[: bisect_right(entries, (bound, _AFTER))]

    def arrived_by(self, at: float) -> list[tuple[float, int, str]]:
        """Requests that arrived at ``at`` or before (callers re-check their own predicate)."""
        return self._arrivals[: bisect_right(self._arrivals, (at, _AFTER))]

    def needing_more_than(self, tokens: int) -> list[tuple[int, int, str]]:
        return self._needs[bisect_right(self._needs, (tokens, _AFTER)):]

    def check(self, state: ClusterState) -> None:
        """Raise AssertionError unless the index equals one rebuilt from the books."""
        self.refresh(state)
        fresh = AttentionIndex()
        for session_id in state.sessions:
            fresh.touch(session_id)
        fresh.refresh(state)
        assert self._filed == fresh._filed, "gated requests filed wrongly"
        assert self.others == fresh.others, "attention set indexed wrongly"
        pinned = {where: tokens for where, tokens in self.pinned.items() if tokens}
        assert pinned == {w: t for w, t in fresh.pinned.items() if t}, "pinned tokens wrong"
        for scope, entries in self._scopes.items():
            assert entries == sorted(fresh._scopes.get(scope, [])), f"{scope} bucket wrong"


def may_fit(view: Overlay, record: SessionRecord, need: int, bounds: dict[Location, int], most: int) -> bool:
    """A necessary condition for ``TierPlanner._place_on_gpu`` to succeed, on the plan's
    view (see ``AttentionIndex.room_bounds``; ``most``: the largest bound). The index
    files each gated request by the same test, on the books."""
    here = view.location(record.session_id)
    if here.tier is Tier.GPU:
        return need - view.footprint(record.session_id) <= bounds[here]
    if here.tier is Tier.DRAM:
        return need <= bounds[Location(Tier.GPU, here.replica)]
    return need <= most
