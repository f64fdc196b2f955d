"""The node agent: executes the controller's KV moves on one node, two-phase, and reports occupancy.

A plain class, clock-injected; `workers/node_agent_service.py` puts it behind
gRPC and in a Ray actor. It owns the node's DRAM tier (`DramStore`) and the
node's link to the cluster-wide shared tier (`SharedTier`, Redis).

Every move is prepare -> complete | abort, as in node_agent.proto:
- prepare does all the copying and pins the session, so that complete cannot
  fail for lack of room or a lost link, and abort only undoes copies; the one
  exception is a DROP of a shared copy, whose delete is the move itself: refused
  by the shared tier, the move is aborted (never committed with its copy left);
- until complete, the session's KV stays usable where it was: a move that fails
  halfway leaves the session in its old tier;
- a prepared move whose lease runs out is aborted.

Where a session is, as the agent sees it:
- DRAM index label "gpu" (`Tier.GPU.label`): in the GPU tier of its replica (the
  DRAM copy is a write-through copy, redundant); also a session whose blocks a
  replica's engine holds (its connector's ``held_sessions``);
- label "dram": in this node's DRAM tier;
- label "pinned": where the move that pinned it started;
- in the shared tier and not here: shared.

The DRAM tier never evicts on its own (the planner is the only policy): a promotion
from the shared tier that does not fit lets go of redundant "gpu" copies only
(`dram_store.write_session`), and is refused if that is not enough; a copy the
controller books in DRAM leaves only by a move the controller orders.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from dataclasses import dataclass
from enum import Enum

from proto.tiers import Tier
from workers.dram_store import PINNED, REDUNDANT, DramStore, MissingBlocks, write_session
from workers.connector_control import read_all_connector_stats, release_sessions, staged_from_shared
from workers.shared_tier import SharedTier
from workers.tier_errors import TierError, TierFull

log = logging.getLogger(__name__)

DRAM_HOMES = (Tier.GPU, Tier.DRAM)  # tiers a DRAM copy's label can name


class Refused(Exception):
    """A move the agent will not prepare; `reason` is a RefusalReason name."""

    def __init__(self, reason: str, message: str, available_bytes: int = 0):
        super().__init__(message)
        self.reason, self.available_bytes = reason, available_bytes


class MoveKind(Enum):
    DEMOTE = "demote"
    PROMOTE = "promote"
    DROP = "drop"


@dataclass
class PreparedMove:
    move_id: str
    session_id: str
    kind: MoveKind
    src: Tier
    dst: Tier
    replica_id: str
    deadline: float
    old_label: str | None  # the DRAM label to restore on abort
    copied_to_shared: bool = False
    copied_to_dram: bool = False
    reserved_bytes: int = 0


@dataclass(frozen=True)
class SessionPlace:
    session_id: str
    tier: Tier
    replica_id: str
    kv_bytes: int
    kv_tokens: int
    pinned_by_move_id: str = ""


class NodeAgent:
    def __init__(self, node_id: str, dram: DramStore, shared: SharedTier | None, *, dram_dir: str):
        self.node_id = node_id
        self.instance_id = uuid.uuid4().hex  # changes when the agent (and its DRAM tier) restarts
        self.dram, self.shared, self.dram_dir = dram, shared, dram_dir
        self._undos: list[PreparedMove] = []  # undos a full tmpfs refused: tried again on every call
        self.moves: dict[str, PreparedMove] = {}
        self.finished: dict[str, str] = {}  # move_id -> "committed" | "aborted", for idempotent retries
        self.report_seq = 0
        self.unpinned = self._unpin_orphans()

    def _unpin_orphans(self) -> list[str]:
        """Copies pinned by moves of an agent that died (the DRAM tier outlives it; its moves
        do not): those moves are aborted. Each copy becomes redundant ("gpu"), outside the
        controller's DRAM books, which drops a restarted agent's DRAM sessions: a later write
        may let it go, and nothing holds it forever."""
        orphans = [s.session_id for s in self.dram.sessions() if s.label == PINNED]
        for session_id in orphans:
            self.dram.set_label(session_id, REDUNDANT)
        if orphans:
            log.warning("node %s: %d copies pinned by moves of a previous agent; those moves are aborted and the "
                        "copies left redundant", self.node_id, len(orphans))
        return orphans

    # ---- two-phase moves ----
    def prepare(self, move_id: str, session_id: str, kind: MoveKind, src: Tier, dst: Tier,
                replica_id: str, lease_s: float, now: float) -> PreparedMove:
        self.expire(now)
        if move_id in self.moves:
            return self.moves[move_id]  # a retried prepare: same answer
        if move_id in self.finished:
            raise Refused("REFUSAL_REASON_MOVE_FINISHED", f"move {move_id} already {self.finished[move_id]}")
        if any(m.session_id == session_id for m in self.moves.values()):
            raise Refused("REFUSAL_REASON_SOURCE_BUSY", f"session {session_id} is in another move")
        local = self.dram.session(session_id)
        if src == Tier.GPU and kind is MoveKind.DROP and local is not None and local.label != Tier.GPU.label:
            local = None  # a copy booked in a tier of its own: dropping the GPU tier releases the engine's hold only
        move = PreparedMove(move_id, session_id, kind, src, dst, replica_id, now + lease_s,
                            local.label if local else None)
        if src in (Tier.GPU, Tier.DRAM) and local is None:
            # A drop needs no copy: a GPU-tier session whose write-through was refused or let go
            # (`write_session`) has its KV only in the engine, and the drop must still release
            # the engine's hold on it (on complete); refusing it would leak those blocks for good.
            if kind is not MoveKind.DROP:
                raise Refused("REFUSAL_REASON_SOURCE_NOT_FOUND", f"session {session_id} has no KV on node {self.node_id}")
        elif src in (Tier.GPU, Tier.DRAM):
            self._write(lambda: self.dram.set_label(session_id, PINNED))
            if kind is not MoveKind.DROP:
                # GPU -> DRAM copies nothing now (the write-through did), but the DRAM copy becomes
                # the session's home: its bytes are what this move demotes.
                move.reserved_bytes = local.nbytes
        try:
            if dst == Tier.SHARED:
                self._write(lambda: self._copy_to_shared(move, local))
            elif src == Tier.SHARED and dst in (Tier.GPU, Tier.DRAM):
                self._write(lambda: self._copy_from_shared(move))
        except BaseException:
            self._undo_or_later(move)
            raise
        self.moves[move_id] = move
        return move

    def _write(self, step) -> None:
        """A step that writes the node's tmpfs (its DRAM index or blocks): a full or failing tmpfs
        refuses the move (insufficient capacity), never an error the caller cannot read."""
        try:
            step()
        except (OSError, sqlite3.Error) as error:
            raise Refused("REFUSAL_REASON_INSUFFICIENT_CAPACITY", f"the DRAM tier of node {self.node_id} refused "
                          f"a write ({type(error).__name__}: {error})") from error

    def complete(self, move_id: str, now: float) -> tuple[str, Tier]:
        self.expire(now)
        if move_id in self.finished:
            return self.finished[move_id], Tier.WAITING
        move = self.moves.pop(move_id, None)
        if move is None:
            return "unknown", Tier.WAITING
        if move.src == Tier.SHARED and move.dst == Tier.WAITING and not self._dropped_from_shared(move):
            return "aborted", move.src
        try:
            self._commit(move)
        except (OSError, sqlite3.Error) as error:  # the node's tmpfs full: its index or the engine's control file
            log.warning("move %s could not commit (%s: %s); undone", move_id, type(error).__name__, error)
            self._undo_or_later(move)
            self.finished[move_id] = "aborted"
            return "aborted", move.src
        self.finished[move_id] = "committed"
        log.info("move %s committed: session %s %s -> %s", move_id, move.session_id, move.src.name, move.dst.name)
        return "committed", move.dst

    def _commit(self, move: PreparedMove) -> None:
        """A prepared move's last steps. The engine's release line goes first: on a full tmpfs it
        fails before anything changed, so the move aborts whole instead of half-committed."""
        s = move.session_id
        if move.src == Tier.GPU and move.dst != Tier.GPU:
            release_sessions(self.dram_dir, move.replica_id, [s])
        if move.dst in DRAM_HOMES:
            self.dram.set_label(s, move.dst.label)
            if move.copied_to_dram:
                staged_from_shared(self.dram_dir, move.replica_id, [s])  # counts the engine's next load as shared
                if self.shared is not None:  # a copy left by a refused drop: the controller's reconciliation drops it
                    self._shared_call(lambda: self.shared.drop_session(s), "drop after promote")
        elif move.src in DRAM_HOMES and move.old_label is not None:  # the copy this move pinned
            self.dram.drop_session(s)  # (a drop from the shared tier leaves a node-local copy to its own owner)
        if move.dst == Tier.WAITING and move.src == Tier.DRAM and self.shared is not None:
            self._shared_call(lambda: self.shared.drop_session(s), "drop")

    def abort(self, move_id: str, reason: str) -> str:
        move = self.moves.pop(move_id, None)
        if move is None:
            return self.finished.get(move_id, "unknown")
        self._undo(move)
        self.finished[move_id] = "aborted"
        log.info("move %s aborted (%s): session %s stays in %s", move_id, reason, move.session_id, move.src.name)
        return "aborted"

    def _undo_or_later(self, move: PreparedMove) -> None:
        """Undo ``move``; an undo the full tmpfs refuses too is tried again on every later call."""
        try:
            self._undo(move)
        except (OSError, sqlite3.Error) as error:
            log.warning("move %s: undo failed (%s); tried again on the next call", move.move_id, type(error).__name__)
            self._undos.append(move)

    def _retry_undos(self) -> None:
        pending, self._undos = self._undos, []
        for move in pending:
            self._undo_or_later(move)

    def expire(self, now: float) -> list[str]:
        self._retry_undos()
        expired = [m.move_id for m in self.moves.values() if m.deadline <= now]
        for move_id in expired:
            self.abort(move_id, "lease expired")
        return expired

    def _dropped_from_shared(self, move: PreparedMove) -> bool:
        """A DROP of a shared copy: the delete is the move, so one the shared tier refuses
        (down, stalled) aborts it instead of committing a copy that stays, held by nobody;
        the controller retries it (``LiveController.unreleased``, or its next plan)."""
        if self.shared is None:
            return True
        try:
            self.shared.drop_session(move.session_id)
            return True
        except TierError as e:
            log.warning("move %s aborted: the shared tier refused to drop session %s (%s)",
                        move.move_id, move.session_id, type(e).__name__)
            self._undo(move)
            self.finished[move.move_id] = "aborted"
            return False

    def _undo(self, move: PreparedMove) -> None:
        s = move.session_id
        if move.copied_to_shared and self.shared is not None:
            self._shared_call(lambda: self.shared.drop_session(s), "undo copy")
        if move.copied_to_dram:
            self.dram.drop_session(s)
        elif move.old_label is not None:
            self.dram.set_label(s, move.old_label)

    def _copy_to_shared(self, move: PreparedMove, local) -> None:
        if self.shared is None:
            raise Refused("REFUSAL_REASON_DESTINATION_UNAVAILABLE", "this node has no shared tier configured")
        hashes = list(local.block_hashes)
        try:
            missing = self.shared.missing_blocks(hashes)
            blocks = self.dram.read_blocks(missing)
            if len(blocks) != len(missing):
                raise Refused("REFUSAL_REASON_SOURCE_NOT_FOUND", f"session {local.session_id} lost blocks in DRAM")
            move.reserved_bytes = self.shared.put_session(local.session_id, local.tenant, hashes, blocks, local.tokens)
        except TierError as e:
            raise _refusal(e) from None
        move.copied_to_shared = True

    def _copy_from_shared(self, move: PreparedMove) -> None:
        if self.shared is None:
            raise Refused("REFUSAL_REASON_SOURCE_NOT_FOUND", "this node has no shared tier configured")
        try:
            remote = self.shared.get_session(move.session_id)
            if remote is None:
                raise Refused("REFUSAL_REASON_SOURCE_NOT_FOUND", f"session {move.session_id} is not in the shared tier")
            blocks = self.shared.get_blocks(self.dram.missing(remote.block_hashes))
        except TierError as e:
            raise _refusal(e) from None
        try:
            # The controller ordered this promotion, so it may let redundant "gpu" copies go.
            dropped = write_session(self.dram, move.session_id, tenant=remote.tenant, replica=move.replica_id,
                                    label=PINNED, tokens=remote.tokens, block_hashes=list(remote.block_hashes),
                                    blocks=blocks)
            if dropped:
                log.info("move %s: dropped %d redundant DRAM copies to stage session %s",
                         move.move_id, len(dropped), move.session_id)
        except (TierFull, MissingBlocks) as e:
            free = self.dram.capacity_bytes - self.dram.used_bytes()
            raise Refused("REFUSAL_REASON_INSUFFICIENT_CAPACITY",
                          f"DRAM tier on {self.node_id} cannot fit session {move.session_id}: {e}", free) from None
        move.copied_to_dram = True
        move.reserved_bytes = remote.nbytes

    def _shared_call(self, fn, what: str) -> None:
        try:
            fn()
        except TierError as e:  # the shared tier logs the outage; the controller's reconciliation drops the leftover
            log.debug("shared tier %s skipped: %s", what, e)

    # ---- reports ----
    def places(self) -> list[SessionPlace]:
        pinned = {m.session_id: m.move_id for m in self.moves.values()}
        places = []
        for s in self.dram.sessions():
            if s.label == PINNED:
                tier = self.moves[pinned[s.session_id]].src if s.session_id in pinned else Tier.DRAM
            else:
                tier = Tier.from_label(s.label)
            places.append(SessionPlace(s.session_id, tier, s.replica, s.nbytes, s.tokens, pinned.get(s.session_id, "")))
        listed = {(p.session_id, p.replica_id) for p in places if p.tier == Tier.GPU}
        for replica, stats in read_all_connector_stats(self.dram_dir).items():
            held = stats.get("held_sessions")
            for session, tokens in (held.items() if isinstance(held, dict) else ()):
                if (session, replica) not in listed:  # held by the engine, no write-through copy here
                    places.append(SessionPlace(session, Tier.GPU, replica, 0, int(tokens)))
        return places

    def shared_instance(self) -> str:
        """The shared tier's server instance (``SharedTier.instance_id``); "" when there is
        none or it cannot be reached."""
        if self.shared is None:
            return ""
        try:
            return self.shared.instance_id()
        except TierError:
            return ""


def _refusal(error: TierError) -> Refused:
    if isinstance(error, TierFull):
        return Refused("REFUSAL_REASON_INSUFFICIENT_CAPACITY", str(error), error.available)
    return Refused("REFUSAL_REASON_DESTINATION_UNAVAILABLE", str(error))
