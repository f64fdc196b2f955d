"""The tier planner: ``plan(state, now) -> Plan``. Pure: it reads the state and the
clock it is given and returns decisions; it never mutates anything.

The ranking is MORI's: sessions ordered by idleness ι, the least idle in HBM, the
next in the node's DRAM, then the shared tier, then nowhere. Tier boundaries are
not thresholds; they fall where each tier's capacity runs out. The planner keeps
that order lazily: a session moves only when it is in the wrong tier and capacity
forces it (sticky), which is when

- a tier is over capacity (a capacity cut; a replica shrank): its movable
  residents go down, those in a tool call before those waiting for the LLM,
  most idle first. A session in an LLM call is pinned until its step ends; the
  call's end is an event and the next plan moves it;
- a session wants HBM (a request arrived, or its tool call returned and the
  client said so): it is promoted at once if it fits, or else displaces GPU
  residents that are in a tool call, most idle first; only if the whole room can
  be made does anything move. Otherwise it is gated. A request displaces any of
  them: it is about to be an LLM call, and the demotion order puts every session
  in a tool call before it. (Comparing the requester's own ι instead, which its
  last long gap set high, starved sessions returning from a long tool call while
  busier sessions idled in HBM and the engine had work to spare.) A prefetch (no
  request yet) is itself in a tool call: it displaces only residents more idle
  than itself.

Demotion cascades: a session demoted into a full tier pushes that tier's more
idle residents one tier further down, or, if none is more idle, goes further down
itself. So every tier's residents stay less idle than the next tier's, at the
boundary where it was forced.

Promotion order: returning sessions whose KV still exists (GPU, DRAM, shared),
then returning sessions whose KV was dropped, each lowest ι first; then new
sessions, smallest context first; then prefetches (no request yet). Later groups
may backfill capacity an earlier one could not use (a large request does not
block small ones; a 5 s backstop tick retries it).

Anti-starvation: backfilling alone can starve a large request for ever (smaller
ones keep taking each freed slot). A request that has waited ``starvation_age_s``
goes first, oldest first, and may displace any movable resident. If it still does
not fit, it holds one GPU tier (see ``_hold_for``) where nothing younger is admitted;
there calls only end, so its room bound only grows, and it runs within its age plus
the longest call running there plus one plan interval (``test_planner_starvation``).

Tenant shares (``controller.policy.shares``): a session whose tenant is at its share of
the GPU tier makes room only by displacing its own tenant's sessions; otherwise it waits,
and it neither holds a tier when aged nor marks a need as futile for other tenants.

Cost: a plan touches only the sessions that changed since the last one (through the
state's index, ``controller.policy.waiting``), those that may fit, and the tiers
over capacity; idleness is computed on demand for the residents of the tiers it inspects.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

from proto.names import tenant_of
from controller.policy.overlay import Overlay
from controller.policy.planner_config import PlannerConfig
from controller.policy.shares import GpuShares
from controller.policy.state import ClusterState, SessionRecord
from controller.policy.waiting import may_fit
from controller.policy.types import (
    WAITING,
    Admit,
    CAPPED_REASON,
    HELD_REASON,
    Gate,
    Location,
    MoveReason,
    Phase,
    Plan,
    Release,
    Tier,
)


class TierPlanner:
    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()
        self.shares = GpuShares(self.config.gpu_shares)

    def plan(self, state: ClusterState, now: float) -> Plan:
        state.index.refresh(state)  # a cache of the books, brought up to date: no decision
        view = Overlay(state, now)
        releases = self._releases(state, view)
        self._fix_overflow(state, view)
        admits, gates, waiting = self._promote(state, view, now)
        return Plan(releases=tuple(releases), moves=tuple(view.moves), admits=tuple(admits), tried=tuple(gates),
                    waiting=waiting)

    # -- steps ----------------------------------------------------------------

    def _releases(self, state: ClusterState, view: Overlay) -> list[Release]:
        releases = []
        for session_id, _ in sorted(state.index.others.items(), key=lambda item: item[1]):
            record = state.sessions[session_id]
            if record.closing and record.phase is not Phase.LLM:
                releases.append(Release(session_id, record.location))
                view.release(session_id)
        return releases

    def _fix_overflow(self, state: ClusterState, view: Overlay) -> None:
        over = [where for where in state.capacity if view.free(where) < 0]
        for where in sorted(over, key=lambda loc: (loc.tier, loc.replica or "")):
            for _, _, session_id in list(view.demotion_order(where)):  # (a copy: the order follows each move)
                if view.free(where) >= 0:
                    break
                self._push_down(view, session_id, Tier(where.tier + 1), MoveReason.OVERFLOW)

    def _promote(self, state: ClusterState, view: Overlay,
                 now: float) -> tuple[list[Admit], list[Gate], tuple[str, ...]]:
        """Each session that wants HBM is tried (in priority order) or, when ``may_fit`` says
        it cannot fit, held untried; the index finds the tried ones without walking the rest."""
        gates: list[Gate] = []
        largest = state.largest_gpu()
        bounds = state.index.room_bounds(state)
        most = max(bounds.values(), default=0)
        index, tried = state.index, set()
        moved = {move.session_id for move in view.moves}  # by overflow: the index has them elsewhere
        for need, _, session_id in index.needing_more_than(largest):
            # Accepted when a larger replica existed (gone): the caller fails it or waits.
            tried.add(session_id)
            gates.append(Gate(session_id, _too_large(need, largest)))
        age = self.config.starvation_age_s

        def aged(record: SessionRecord) -> bool:
            return age is not None and record.request is not None and now - record.request.arrived_at >= age

        # Moved by overflow (the index has them where they were), closing, or prefetching;
        # read before any admit of this plan changes the view:
        keyed = []
        others = [(s, state.attention.get(s)) for s in moved] + list(index.others.items())
        for session_id, seq in others:
            record = state.sessions[session_id]
            if seq is None or session_id in tried or view.released(session_id) or record.closing \
                    or not record.waiting_for_gpu or (record.request is None and not self.config.prefetch):
                continue
            need = self._need(record)
            if not aged(record) and need <= largest and may_fit(view, record, need, bounds, most):
                tried.add(session_id)  # (a request held here is in the plan's waiting list)
                keyed.append((self._promotion_key(view, record), seq, record))
        held: set[Location] = set()  # GPU tiers held by aged requests: nothing younger goes there

        def younger() -> Iterable:
            """The rest in priority order, ranked only if some GPU tier is still unheld
            once the aged requests are placed."""
            if len(held) == len(bounds):
                return
            for scope, bound in (*bounds.items(), (None, most)):
                for _, seq, session_id in index.fitting(scope, bound):
                    record = state.sessions[session_id]
                    if session_id not in tried and session_id not in moved and not aged(record):
                        tried.add(session_id)
                        keyed.append((self._promotion_key(view, record), seq, record))
            keyed.sort(key=lambda item: item[:2])
            yield from keyed

        oldest = () if age is None else self._oldest(state, view, now, age, tried, held)
        admits = self._admit_in_order(state, view, chain(oldest, younger()), bounds, gates, held)
        return admits, gates, index.gated()

    def _oldest(self, state: ClusterState, view: Overlay, now: float, age: float, tried: set[str],
                held: set[Location]) -> Iterable:
        """Aged requests, oldest first: their key (-1, arrival) sorts before every other.
        Read only as far as they are used (once every GPU tier is held, the rest stay
        held). One whose GPU tier (where it is now, or its node's) an older one holds would
        be held untried: it is left in the plan's waiting list instead (with tenant shares
        it is tried, for its gate's reason). ``held`` grows as the caller reads."""
        skip_held = not self.shares
        for arrived_at, seq, session_id in state.index.arrived_by(now - age + 1e-6):
            if session_id in tried or now - arrived_at < age:
                continue
            if skip_held and held:
                here = view.location(session_id)
                if here.tier is Tier.DRAM:
                    here = Location(Tier.GPU, here.replica)
                if here in held:
                    continue
            yield (-1, arrived_at), seq, state.sessions[session_id]

    def _admit_in_order(self, state: ClusterState, view: Overlay, keyed: Iterable, bounds: dict[Location, int],
                        gates: list[Gate], held: set[Location]) -> list[Admit]:
        admits = []
        # Inside a group, requests come in ascending idleness (new sessions: ascending size),
        # so each may displace at most what an earlier one could. Once a need failed and
        # nothing has moved since, every later need at least as large fails too: skip it.
        futile: dict[tuple, tuple[int, int]] = {}  # (group, scope) -> (changes, need)
        by_bound = None
        for key, _, record in keyed:
            if len(held) == len(bounds):
                break  # every GPU tier held: nothing younger goes anywhere (the rest are in Plan.waiting)
            aged = key[0] == -1
            scope = (key[0], self._scope(view, record))
            need = self._need(record)
            failed = futile.get(scope)
            if failed and failed[0] != view.changes:
                failed = None  # something moved since: that failure proves nothing now
            growing = scope[1].tier is Tier.GPU  # its need counts what it holds: not comparable
            capped = self.shares.over(view, record.session_id, need) > 0  # at its tenant's GPU share
            replica = None
            if not (failed and not growing and need >= failed[1]):
                replica = self._place_on_gpu(state, view, record, held, aged)
                if replica is None and not capped:  # a capped failure proves nothing for other tenants
                    futile[scope] = (view.changes, min(need, failed[1]) if failed else need)
            if aged and replica is None and not capped:
                if by_bound is None:  # the GPU tiers, most room displacement could free first
                    by_bound = sorted(bounds, key=lambda g: (bounds[g], g.replica or ""), reverse=True)
                held.add(self._hold_for(state, view, record, by_bound, held))
            if record.request is None:
                continue
            if replica is None:
                gates.append(Gate(record.session_id, CAPPED_REASON if capped else HELD_REASON))
            else:
                view.admit(record.session_id, replica, record.request.need_tokens)
                admits.append(Admit(record.session_id, replica, record.request.need_tokens))
        return admits

    def _hold_for(self, state: ClusterState, view: Overlay, record: SessionRecord,
                  by_bound: list[Location], held: set[Location]) -> Location:
        """The GPU tier an aged request that did not fit holds: where it is, its node's
        (from DRAM), or the one with the most room displacement could free, preferring
        tiers no older request holds, so that aged requests spread over the cluster."""
        here = view.location(record.session_id)
        if here.tier is Tier.GPU:
            return here
        if here.tier is Tier.DRAM:
            return Location(Tier.GPU, here.replica)
        need, first = self._need(record), None
        for gpu in (g for g in by_bound if state.capacity[g] >= need):
            if gpu not in held:
                return gpu
            first = first or gpu
        return first

    # -- promotion -------------------------------------------------------------

    def _promotion_key(self, view: Overlay, record: SessionRecord) -> tuple:
        iota = view.idleness(record.session_id)
        if record.request is None:
            return (3, iota)
        if record.history.is_new:
            return (2, record.request.need_tokens)
        if record.location.tier is Tier.WAITING:
            return (1, iota)
        return (0, iota)

    @staticmethod
    def _need(record: SessionRecord) -> int:
        return record.request.need_tokens if record.request else record.context_tokens

    @staticmethod
    def _scope(view: Overlay, record: SessionRecord) -> Location:
        """Where the session may go: its own replica's HBM (from DRAM), any (from
        the shared tier or nowhere), or where it is (growing in place)."""
        here = view.location(record.session_id)
        return here if here.tier is not Tier.SHARED else WAITING

    def _place_on_gpu(self, state: ClusterState, view: Overlay, record: SessionRecord,
                      held: set[Location] = frozenset(), aged: bool = False) -> str | None:
        """Reserve HBM for the session (not in ``held``); its replica, or None: it waits."""
        session_id = record.session_id
        need = self._need(record)
        here = view.location(session_id)
        if here.tier is Tier.GPU:
            if here in held:
                return None
            growth = need - view.footprint(session_id)
            return here.replica if self._room(view, here, growth, session_id, aged) else None
        if here.tier is Tier.DRAM:
            candidates = [Location(Tier.GPU, here.replica)]
        else:
            candidates = self._best_fit(state, view, need, held)
        for target in candidates:
            if target not in held and self._room(view, target, need, session_id, aged):
                if here.tier is Tier.SHARED and record.request is not None and view.recompute_sooner(session_id):
                    view.move(session_id, WAITING, 0, MoveReason.RECOMPUTE)  # its call prefills it
                view.move(session_id, target, need, MoveReason.PROMOTE)
                return target.replica
        return None

    def _best_fit(self, state: ClusterState, view: Overlay, need: int,
                  held: set[Location] = frozenset()) -> list[Location]:
        """GPU tiers to try: those where the need fits, tightest first (best fit),
        then the rest by most free room, where displacement has the best chance.
        Tiers in ``held`` are not offered."""
        gpus = [Location(Tier.GPU, r) for r in state.replicas if Location(Tier.GPU, r) not in held]
        fitting = sorted(
            (g for g in gpus if view.free(g) >= need), key=lambda g: (view.free(g), g.replica)
        )
        if fitting or not self.config.displacement:
            return fitting[:1]
        roomiest = sorted(
            (g for g in gpus if state.capacity[g] >= need),
            key=lambda g: (-view.free(g), g.replica),
        )
        # Looking for victims costs an idleness sort per replica; the roomiest few are where it is cheapest.
        return roomiest[: self.config.displacement_candidates]

    def _room(self, view: Overlay, target: Location, amount: int, requester: str, aged: bool = False) -> bool:
        """Make ``amount`` tokens free in a GPU tier, displacing if allowed. An aged
        request may displace every movable resident, those waiting for HBM too:
        otherwise two requests could hold each other off for ever."""
        over = self.shares.over(view, requester, self._need(view.record(requester)))
        if over > 0:  # at its tenant's GPU share: room only from its own sessions, at least ``over``
            if not (aged or (self.config.displacement and view.record(requester).request is not None)):
                return False
            return self._make_room(view, target, amount, -1.0, MoveReason.DISPLACED, keep=requester,
                                   wanting_more_idle_than=-1.0 if aged else view.idleness(requester),
                                   tenant=tenant_of(requester), own=over)
        if amount <= view.free(target):
            return True
        if aged:
            return self._make_room(view, target, amount, -1.0, MoveReason.DISPLACED,
                                   wanting_more_idle_than=-1.0, keep=requester)
        if not self.config.displacement:
            return False
        if view.record(requester).request is not None:
            # Every resident in a tool call may go, most idle first; then residents that
            # want HBM too but are more idle (two requests growing in one full tier would
            # otherwise wait for each other until both time out).
            return self._make_room(view, target, amount, -1.0, MoveReason.DISPLACED,
                                   wanting_more_idle_than=view.idleness(requester))
        threshold = view.idleness(requester) + self.config.displace_margin
        return self._make_room(view, target, amount, threshold, MoveReason.DISPLACED, wanting_more_idle_than=None)

    def _make_room(self, view: Overlay, target: Location, amount: int, more_idle_than: float, reason: MoveReason, *,
                   wanting_more_idle_than: float | None = -1.0, keep: str = "", tenant: str | None = None,
                   own: int = 0) -> bool:
        """Free ``amount`` tokens in ``target`` by pushing residents more idle than
        ``more_idle_than`` one tier down, most idle first. Residents that want HBM
        themselves (last in the order) go only when more idle than
        ``wanting_more_idle_than`` (None: never). All or nothing: if the room cannot
        be made in full, nothing moves. ``keep`` (the requester) never goes. ``tenant``: only
        that tenant's sessions go, ``own`` tokens of them at least (a tenant at its GPU share)."""
        if view.room_bound(target) < amount:
            return False  # (every resident that may go would not be enough: skip the walk)
        room = free = view.free(target)
        victims = []
        for _, negative_iota, session_id in view.demotion_order(target):
            if session_id == keep or (tenant is not None and tenant_of(session_id) != tenant):
                continue
            iota = -negative_iota
            if (room >= amount and room - free >= own) or iota <= more_idle_than:
                break
            if view.record(session_id).waiting_for_gpu and (
                    wanting_more_idle_than is None or iota <= wanting_more_idle_than):
                break  # the order puts these last, most idle first
            victims.append(session_id)
            room += view.footprint(session_id)
        if room < amount or room - free < own:
            return False
        for session_id in victims:
            self._push_down(view, session_id, Tier(target.tier + 1), reason)
        return True

    # -- demotion --------------------------------------------------------------

    def _push_down(self, view: Overlay, session_id: str, tier: Tier, reason: MoveReason) -> None:
        """Put the session in the highest tier from ``tier`` down that can take it,
        pushing that tier's more idle residents one tier further down."""
        record = view.record(session_id)
        size = record.context_tokens
        replica = view.location(session_id).replica
        iota = view.idleness(session_id)
        for level in range(tier, Tier.WAITING + 1):
            level = Tier(level)
            if level is Tier.DRAM and replica is None:
                continue
            if level is Tier.SHARED and not (self.config.shared_tier and view.link_in_time(session_id, size)):
                continue  # (a copy its link would finish after the session's expected gap: dropped)
            if level is Tier.WAITING:
                target = WAITING
            else:
                target = Location(level, replica if level.per_replica else None)
            if level is not Tier.WAITING and not self._make_room(
                view, target, size, iota, MoveReason.CASCADE
            ):
                continue
            view.move(session_id, target, size, reason)
            return


def _too_large(need: int, largest: int) -> str:
    if largest == 0:
        return "no engine replica is running"
    return f"needs {need} KV tokens; the largest replica holds {largest}"
