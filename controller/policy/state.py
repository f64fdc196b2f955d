"""The cluster's session table and tier accounting: what the planner reads.

``ClusterState`` is a plain class fed by events (requests, calls, tool calls,
closures, capacity changes) with the clock passed in. It never decides anything:
``TierPlanner.plan`` reads it and returns decisions, and ``apply`` records them
once the mechanism has carried them out. ``check_integrity`` states its invariants.

Capacities and footprints are in KV tokens; one cluster serves one model, so bytes
are tokens times the model's KV bytes per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from controller.policy.idleness import DEFAULT_CYCLES, IdlenessHistory
from controller.policy.waiting import AttentionIndex
from controller.policy.types import (
    SHARED,
    WAITING,
    Admit,
    Location,
    Move,
    Phase,
    Plan,
    Release,
    StaleDecision,
    Tier,
    UnknownSession,
)


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    replica_id: str
    gpu_tokens: int  # HBM the engine gives to KV
    dram_tokens: int  # the node's host memory share for this replica's KV

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("replica_id must be a non-empty string")
        if self.gpu_tokens < 0 or self.dram_tokens < 0:
            raise ValueError(f"replica {self.replica_id}: capacities must be >= 0")


@dataclass(slots=True)
class PendingRequest:
    prompt_tokens: int
    need_tokens: int  # prompt + max output: the HBM the call reserves
    arrived_at: float
    # Set on admission: the session's context before the call, and whether its KV existed
    # (not waiting), which an abandoned call (one that never reached the engine) leaves it with.
    kept_context: int = 0
    kept_kv: bool = False


@dataclass(slots=True)
class SessionRecord:
    session_id: str
    location: Location
    context_tokens: int  # KV the session has (or would recompute) between calls
    footprint: int  # tokens it occupies in its tier: its reservation while running
    history: IdlenessHistory
    request: PendingRequest | None = None  # set from arrival until the call finishes
    expecting: bool = False  # the client said its tool call finished: prefetch
    closing: bool = False
    active_at: float = 0.0  # the last event of its client (a request, a call's end, a tool hint)

    @property
    def phase(self) -> Phase:
        return self.history.phase

    @property
    def waiting_for_gpu(self) -> bool:
        return self.phase is Phase.GATED or (self.expecting and self.phase is Phase.TOOL)

    def idleness(self, now: float) -> float:
        return self.history.idleness(now)


class ClusterState:
    def __init__(
        self, replicas: Iterable[ReplicaSpec], shared_tokens: int, *, k: int = DEFAULT_CYCLES
    ) -> None:
        if shared_tokens < 0:
            raise ValueError(f"shared_tokens must be >= 0, got {shared_tokens}")
        self.k = k
        self.sessions: dict[str, SessionRecord] = {}
        self.capacity: dict[Location, int] = {SHARED: shared_tokens}
        self.used: dict[Location, int] = {SHARED: 0, WAITING: 0}
        self.residents: dict[Location, set[str]] = {SHARED: set(), WAITING: set()}
        self.replicas: dict[str, ReplicaSpec] = {}
        # Sessions that want the planner's attention: waiting for GPU or closing, each
        # with a sequence number that orders them as they came (equal-priority requests
        # stay FCFS). ``index`` files them for the planner (``controller.policy.waiting``).
        self.attention: dict[str, int] = {}
        self.index = AttentionIndex()
        # The shared tier's link, as its owner reports it: when it has carried every copy
        # booked on it, and its speed; and how long a replica takes to recompute (prefill)
        # so many tokens of KV. None: not modelled (the planner ignores link time).
        self.shared_link_free_at = 0.0
        self.shared_link_tokens_per_s: float | None = None
        self.recompute_s: Callable[[int], float] | None = None
        self._seq = 0
        for spec in replicas:
            self.set_replica(spec)

    # -- capacity ---------------------------------------------------------------

    def set_replica(self, spec: ReplicaSpec) -> None:
        """Add a replica or change its capacities; overflow is the planner's to fix."""
        self.replicas[spec.replica_id] = spec
        for tier, tokens in ((Tier.GPU, spec.gpu_tokens), (Tier.DRAM, spec.dram_tokens)):
            where = Location(tier, spec.replica_id)
            self.capacity[where] = tokens
            self.used.setdefault(where, 0)
            self.residents.setdefault(where, set())

    def remove_replica(self, replica_id: str, now: float) -> list[str]:
        """The replica is gone with its HBM and DRAM: its sessions' KV is lost.

        Running calls are lost too; their requests wait again. Returns the sessions
        that lost KV. (A graceful drain demotes them to the shared tier first.)
        """
        if replica_id not in self.replicas:
            raise ValueError(f"unknown replica {replica_id!r}")
        lost = []
        for tier in (Tier.GPU, Tier.DRAM):
            where = Location(tier, replica_id)
            for session_id in sorted(self.residents[where]):
                record = self.sessions[session_id]
                if record.phase is Phase.LLM:
                    record.history.call_aborted(now)
                    self._attend(session_id)
                self._relocate(record, WAITING, record.context_tokens)
                lost.append(session_id)
            del self.capacity[where], self.used[where], self.residents[where]
        del self.replicas[replica_id]
        return lost

    def set_shared_capacity(self, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"shared capacity must be >= 0, got {tokens}")
        self.capacity[SHARED] = tokens

    def report_shared_link(self, free_at: float, tokens_per_s: float,
                           recompute_s: Callable[[int], float] | None = None) -> None:
        """The shared tier's link is busy until ``free_at`` and carries ``tokens_per_s``;
        ``recompute_s(tokens)``: a replica's time to prefill that much KV (None: not weighed)."""
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s}")
        self.shared_link_free_at, self.shared_link_tokens_per_s = free_at, tokens_per_s
        self.recompute_s = recompute_s

    def capacity_of(self, where: Location) -> int | None:
        """None for the unbounded waiting set."""
        return None if where.tier is Tier.WAITING else self.capacity[where]

    def free(self, where: Location) -> int:
        capacity = self.capacity_of(where)
        return 10**18 if capacity is None else capacity - self.used[where]

    def largest_gpu(self) -> int:
        return max((spec.gpu_tokens for spec in self.replicas.values()), default=0)

    # -- session events -----------------------------------------------------------

    def open_session(self, session_id: str, now: float) -> SessionRecord:
        if not session_id:
            raise ValueError("session id must be a non-empty string")
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open")
        record = SessionRecord(session_id, WAITING, 0, 0, IdlenessHistory(self.k), active_at=now)
        self.sessions[session_id] = record
        self.residents[WAITING].add(session_id)
        return record

    def get(self, session_id: str) -> SessionRecord:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise UnknownSession(session_id) from None

    def request_arrived(
        self, session_id: str, now: float, prompt_tokens: int, max_output_tokens: int
    ) -> None:
        record = self.get(session_id)
        if record.closing:
            raise ValueError(f"session {session_id!r} is closing")
        if prompt_tokens < 1 or max_output_tokens < 1:
            raise ValueError("prompt_tokens and max_output_tokens must be >= 1")
        need = prompt_tokens + max_output_tokens
        if 0 < self.largest_gpu() < need:  # with no replica at all, the request waits for one
            raise ValueError(
                f"request needs {need} KV tokens (prompt + max output); the largest "
                f"replica holds {self.largest_gpu()}: shorten the prompt or max_tokens"
            )
        record.history.request_arrived(now)
        record.request = PendingRequest(prompt_tokens, need, now)
        record.expecting = False
        record.active_at = now
        self._attend(session_id)

    def call_finished(self, session_id: str, now: float, context_tokens: int) -> None:
        """The engine finished the call; the session's KV is ``context_tokens`` long."""
        record = self.get(session_id)
        if record.phase is not Phase.LLM:
            raise ValueError(f"session {session_id!r} has no call running")
        if not 0 < context_tokens <= record.footprint:
            raise ValueError(
                f"context_tokens must be in 1..{record.footprint} (the reservation), "
                f"got {context_tokens}"
            )
        record.history.call_finished(now)
        record.request = None
        record.context_tokens = context_tokens
        record.active_at = now
        self._relocate(record, record.location, context_tokens)
        if record.closing:  # closed while its call was gated or running: release it now
            self._attend(session_id)

    def call_abandoned(self, session_id: str, now: float) -> None:
        """The admitted call never reached the engine (its caller left): its reservation is
        freed and the session keeps the KV it had before the call, where the admission put
        it; with none (new, or dropped before), it goes back to waiting."""
        record = self.get(session_id)
        if record.phase is not Phase.LLM:
            raise ValueError(f"session {session_id!r} has no call running")
        request = record.request
        record.history.call_abandoned(now)
        record.request = None
        record.active_at = now
        record.context_tokens = request.kept_context
        if request.kept_kv:
            self._relocate(record, record.location, request.kept_context)
        else:
            self._relocate(record, WAITING, 0)

    def tool_call_started(self, session_id: str, now: float) -> None:
        """A hint only (the gap since the last call already counts as tool time); the client is there."""
        self.get(session_id).active_at = now

    def tool_call_finished(self, session_id: str, now: float) -> None:
        """The client says its tool returned: a request is coming, prefetch its KV."""
        record = self.get(session_id)
        record.active_at = now
        if record.phase is Phase.TOOL and not record.history.is_new:
            record.expecting = True
            self._attend(session_id)

    def request_withdrawn(self, session_id: str, now: float) -> None:
        """The gated request will not run (its wait timed out, its client left)."""
        record = self.get(session_id)
        record.history.request_withdrawn(now)
        record.request = None
        record.active_at = now
        if not record.closing:
            self.attention.pop(session_id, None)
        self.index.touch(session_id)

    def restore_session(self, session_id: str, where: Location, context_tokens: int, now: float) -> None:
        """Re-enter a session found in a tier after a controller restart. Its idleness
        history is lost: it starts again as new (ι = 0). Overflow is the planner's to fix."""
        if context_tokens < 1:
            raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
        if where.tier is not Tier.WAITING and where not in self.capacity:
            raise ValueError(f"unknown location {where}")
        record = self.open_session(session_id, now)
        record.context_tokens = context_tokens
        self._relocate(record, where, context_tokens)

    def close_session(self, session_id: str, now: float) -> None:
        record = self.get(session_id)
        record.closing = True
        self._attend(session_id)

    # -- recording decisions ----------------------------------------------------------

    def apply(self, plan: Plan, now: float) -> None:
        """Record a plan the mechanism carried out. A decision that does not match
        the state raises ``StaleDecision`` before anything of it is recorded."""
        for release in plan.releases:
            self._apply_release(release)
        for move in plan.moves:
            self.apply_move(move)
        for admit in plan.admits:
            self.apply_admit(admit, now)

    def apply_move(self, move: Move) -> None:
        record = self.get(move.session_id)
        if record.location != move.src:
            raise StaleDecision(f"{move.session_id} is in {record.location}, not {move.src}")
        if record.phase is Phase.LLM:
            raise StaleDecision(f"{move.session_id} is in an LLM call; it moves after it")
        if move.dst.tier is not Tier.WAITING and move.tokens > self.free(move.dst):
            raise StaleDecision(f"{move.dst} has {self.free(move.dst)} free, needs {move.tokens}")
        self._relocate(record, move.dst, move.tokens)
        if move.is_promotion and record.phase is Phase.TOOL:
            record.expecting = False  # the prefetch is done
            if not record.closing:  # closed while the move was carried out: it waits for its release
                self.attention.pop(move.session_id, None)

    def apply_admit(self, admit: Admit, now: float, was: Location | None = None) -> None:
        """``was``: where the session's KV was when the admitting plan was made (before its
        moves); None: where the books have it now. KV that was waiting was never there."""
        record = self.get(admit.session_id)
        where = Location(Tier.GPU, admit.replica)
        if record.location != where or record.phase is not Phase.GATED or record.request is None:
            raise StaleDecision(f"{admit.session_id} is not gated on {where}")
        if admit.tokens < record.request.need_tokens:  # planned for an earlier request, since withdrawn
            raise StaleDecision(f"{admit.session_id} needs {record.request.need_tokens}, not {admit.tokens}")
        growth = admit.tokens - record.footprint
        if growth > self.free(where):
            raise StaleDecision(f"{where} has {self.free(where)} free, needs {growth} more")
        record.request.kept_context = record.context_tokens
        record.request.kept_kv = record.context_tokens > 0 and (was or record.location).tier is not Tier.WAITING
        record.active_at = now
        self._relocate(record, where, admit.tokens)
        # The engine's KV is now the prompt: longer than the last context as the
        # conversation grows, shorter when the client compacted it.
        record.context_tokens = record.request.prompt_tokens
        record.history.call_started(now)
        self.attention.pop(admit.session_id, None)

    def _apply_release(self, release: Release) -> None:
        record = self.get(release.session_id)
        if record.location != release.location or not record.closing:
            raise StaleDecision(f"{release.session_id} is not closing in {release.location}")
        self.used[record.location] -= record.footprint
        self.residents[record.location].discard(release.session_id)
        del self.sessions[release.session_id]
        self.attention.pop(release.session_id, None)
        self.index.touch(release.session_id)

    def _attend(self, session_id: str) -> None:
        if session_id not in self.attention:  # one already there keeps its place
            self._seq += 1
            self.attention[session_id] = self._seq
        self.index.touch(session_id)

    def _relocate(self, record: SessionRecord, where: Location, footprint: int) -> None:
        footprint = 0 if where.tier is Tier.WAITING else footprint
        self.used[record.location] -= record.footprint
        self.residents[record.location].discard(record.session_id)
        self.used[where] += footprint
        self.residents[where].add(record.session_id)
        record.location, record.footprint = where, footprint
        self.index.touch(record.session_id)

    # -- views ------------------------------------------------------------------

    def idle_sessions(self, now: float, ttl_s: float) -> list[str]:
        """Sessions with no call running or gated, not closing, whose client has sent
        nothing for ``ttl_s`` seconds or more."""
        return [s for s, r in self.sessions.items()
                if r.phase is Phase.TOOL and not r.closing and now - r.active_at >= ttl_s]

    def locations(self) -> Iterator[Location]:
        return iter(self.residents)

    def pinned_tokens(self, where: Location) -> int:
        """Tokens held by sessions whose LLM call runs: they cannot move now."""
        return sum(
            self.sessions[s].footprint
            for s in self.residents[where]
            if self.sessions[s].phase is Phase.LLM
        )

    def check_integrity(self) -> None:
        """Raise AssertionError if the accounting is inconsistent."""
        seen: set[str] = set()
        for where, members in self.residents.items():
            assert not (members & seen), f"sessions in two tiers: {members & seen}"
            seen |= members
            total = 0
            for session_id in members:
                record = self.sessions[session_id]
                assert record.location == where, f"{session_id} filed under {where}"
                assert record.footprint >= 0
                total += record.footprint
                if record.phase is Phase.LLM:
                    assert where.tier is Tier.GPU, f"{session_id} runs outside the GPU tier"
                    assert record.request is not None
                    assert record.footprint >= record.context_tokens
            assert total == self.used[where], f"{where}: used {self.used[where]} != {total}"
            capacity = self.capacity_of(where)
            if capacity is not None:
                # Over capacity only while sessions pinned in an LLM call hold the
                # excess (after a capacity cut); everything movable has moved.
                bound = max(capacity, self.pinned_tokens(where))
                assert self.used[where] <= bound, f"{where}: {self.used[where]} > {capacity}"
        assert seen == set(self.sessions), "a session is in no tier"
        self.index.check(self)
        for session_id in self.sessions:
            record = self.sessions[session_id]
            if record.location.replica is not None:
                assert record.location.replica in self.replicas
            if record.phase is Phase.GATED:
                assert record.request is not None and session_id in self.attention
