"""A node's DRAM tier: KV blocks in host shared memory, shared by every process on the node.

Who uses it:
- the engine's KV connector (workers/kv_connector.py) writes a session's blocks
  through when its call finishes and reads them back when a call hits them;
- the node agent moves sessions between this tier and the shared tier, changes
  tier labels, and reports occupancy.

These are different processes (an engine core per replica, one agent per node),
so the store lives in a folder on tmpfs (`/dev/shm`, i.e. host DRAM): one file
per block, content-addressed by vLLM's block hash (which already includes the
tenant's `cache_salt`, so tenants never share blocks), and an SQLite index
whose transactions make capacity checks atomic across processes.

Each session's label is the tier the controller books it in, spelled `Tier.label`:
- "dram": the controller placed the session in this node's DRAM tier; this copy is
  its home, and the controller's books count it (within the tier's capacity);
- "gpu": the session is in its replica's GPU tier; this copy is the write-through,
  redundant while the engine holds the KV, and outside the controller's DRAM books;
- "pinned" (not a tier): a prepared move owns the copy until it completes or aborts.

Mechanism, not policy: the store never evicts on its own. Capacity is a hard limit:
a write that does not fit raises `TierFull` and changes nothing, and so does a
tmpfs that fills up below the capacity (no partial file is left; a process killed
mid-write leaves files that the next store opened on the folder removes). A caller may name
sessions to drop for room (`put_session(evict=...)`); the store drops a named one
only while it is a redundant "gpu" copy, and only if that makes the write fit.
The callers' rule, which `write_session` applies for them: a write may let redundant
copies go, least recently written first, never a booked one.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from proto.names import path_safe_id
from proto.tiers import Tier
from workers.dram_files import orphan_files, volume_problem
from workers.tier_errors import TierFull

log = logging.getLogger(__name__)

REDUNDANT = Tier.GPU.label  # a GPU-tier session's write-through copy
PINNED = "pinned"  # mid-move: a marker, not a tier; never dropped until the move completes or aborts
LABELS = (Tier.GPU.label, Tier.DRAM.label, PINNED)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")  # a block key names its file: no dot, no slash

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (hash TEXT PRIMARY KEY, nbytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session TEXT PRIMARY KEY, tenant TEXT NOT NULL, tokens INTEGER NOT NULL,
    label TEXT NOT NULL, replica TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS session_blocks (
    session TEXT NOT NULL, pos INTEGER NOT NULL, hash TEXT NOT NULL,
    PRIMARY KEY (session, pos));
CREATE INDEX IF NOT EXISTS session_blocks_hash ON session_blocks(hash);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def node_dram_dir(root: str | Path, node_id: str) -> str:
    """The DRAM tier folder of one Ray node under the platform's root (engines and agent agree on it)."""
    return str(Path(root) / path_safe_id("node id", node_id))


@dataclass(frozen=True)
class DramSession:
    session_id: str
    tenant: str
    tokens: int
    label: str  # Tier.label of the tier the controller books it in, or PINNED
    replica: str
    block_hashes: tuple[str, ...]
    nbytes: int  # bytes of its blocks, shared ones counted in full


class MissingBlocks(ValueError):
    """A block of the chain is neither given nor stored: dropped since the caller looked.
    Nothing changed; the caller may retry with the block, or skip the write."""


class DramStore:
    """The node's DRAM tier. Safe to open from several processes at once; one object is not thread-safe."""

    def __init__(self, root: Path | str, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"DRAM tier capacity must be positive, got {capacity_bytes} bytes")
        self.root = Path(root)
        self.capacity_bytes = int(capacity_bytes)
        (self.root / "blocks").mkdir(parents=True, exist_ok=True)
        # One connection per DramStore; callers serialise their threads (the agent's servicer holds
        # a lock), so the connection may move between threads.
        self._db = sqlite3.connect(self.root / "index.sqlite3", timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # tmpfs: nothing survives a reboot anyway
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('used_bytes', 0)")
        problem = volume_problem(self.root, self.capacity_bytes)
        if problem:
            # A warning, not a refusal: Lull opens a DRAM tier on every Ray node, also on nodes
            # that run no engine (the KubeRay head, whose /dev/shm is small) and never fill it;
            # the config and the chart refuse a tier that cannot fit where it matters.
            log.warning("DRAM tier at %s: %s; until then writes past the volume fail as tier full", self.root, problem)
        removed = self.remove_orphans()
        if removed:
            log.info("DRAM tier at %s: removed %d files no session owns (left by a killed writer)", self.root, removed)

    def remove_orphans(self) -> int:
        """Remove block files no index entry owns and temporary files of writers that died,
        under the lock; returns how many. A live writer's unindexed file may go too: it
        rewrites it under the lock before indexing it (``_put_locked``)."""
        with self._transaction():
            indexed = {h for (h,) in self._db.execute("SELECT hash FROM blocks")}
            orphans = orphan_files(self.root / "blocks", indexed)
            for path in orphans:
                path.unlink(missing_ok=True)
        return len(orphans)

    # ---- reads ----
    def used_bytes(self) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key='used_bytes'").fetchone()[0]

    def matched_prefix(self, block_hashes: list[str]) -> int:
        """How many leading blocks of this chain are stored (any session's copy counts)."""
        if not block_hashes:
            return 0
        marks = ",".join("?" * len(block_hashes))
        present = {h for (h,) in self._db.execute(f"SELECT hash FROM blocks WHERE hash IN ({marks})", block_hashes)}
        count = 0
        for h in block_hashes:
            if h not in present:
                break
            count += 1
        return count

    def missing(self, block_hashes: Iterable[str]) -> list[str]:
        return [h for h in block_hashes if not self._has_block(h)]

    def _has_block(self, block_hash: str) -> bool:
        return self._db.execute("SELECT 1 FROM blocks WHERE hash=?", (block_hash,)).fetchone() is not None

    def read_blocks(self, block_hashes: Iterable[str]) -> dict[str, bytes]:
        """The stored bytes of each block found; a block dropped meanwhile is absent."""
        found = {}
        for h in block_hashes:
            try:
                found[h] = (self.root / "blocks" / h).read_bytes()
            except FileNotFoundError:
                pass
        return found

    def session(self, session_id: str) -> DramSession | None:
        row = self._db.execute(
            "SELECT tenant, tokens, label, replica FROM sessions WHERE session=?", (session_id,)
        ).fetchone()
        if row is None:
            return None
        blocks = self._db.execute(
            "SELECT sb.hash, b.nbytes FROM session_blocks sb JOIN blocks b ON b.hash = sb.hash "
            "WHERE sb.session=? ORDER BY sb.pos",
            (session_id,),
        ).fetchall()
        return DramSession(session_id, *row, tuple(h for h, _ in blocks), sum(n for _, n in blocks))

    def sessions(self) -> list[DramSession]:
        ids = [s for (s,) in self._db.execute("SELECT session FROM sessions ORDER BY session")]
        return [s for s in map(self.session, ids) if s is not None]

    def redundant_copies(self) -> list[str]:
        """Sessions whose copy here is a GPU-tier session's write-through, least recently written first."""
        rows = self._db.execute("SELECT session FROM sessions WHERE label=? ORDER BY updated, session", (REDUNDANT,))
        return [s for (s,) in rows]

    # ---- writes ----
    def put_session(
        self,
        session_id: str,
        *,
        tenant: str,
        replica: str,
        label: str,
        tokens: int,
        block_hashes: list[str],
        blocks: Mapping[str, bytes],
        evict: Sequence[str] = (),
    ) -> list[str]:
        """Store (or replace) a session's chain; returns the sessions dropped to make room.

        ``blocks`` needs only the hashes not stored yet. A chain that does not fit
        raises TierFull and changes nothing. ``evict`` names the sessions the caller
        lets go to make room, in its order: each is dropped only while it is a
        redundant copy (label "gpu"), never the session written, and only if the
        drops make the write fit. A session pinned by a move stays pinned. Raises
        MissingBlocks if a block is neither given nor stored.
        """
        if label not in LABELS:
            raise ValueError(f"unknown tier label {label!r}; valid: {', '.join(LABELS)}")
        if (bad := next((h for h in block_hashes if not _KEY.fullmatch(h)), None)) is not None:
            raise ValueError(f"a block key names a file: letters, digits, _ and - only; got {bad!r:.80}")
        new = {h: blocks[h] for h in dict.fromkeys(block_hashes) if h in blocks}
        record = (session_id, tenant, tokens, label, replica)
        written: list[str] = []  # files this call created; those left unindexed are removed below
        try:
            self._write_files(new, written)  # outside the lock: the slow part, harmless if unused
            with self._transaction():
                return self._put_locked(record, block_hashes, new, evict, written)
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            raise self._disk_full(new) from e
        except sqlite3.OperationalError as e:  # the index itself on the full tmpfs
            if "full" not in str(e):
                raise
            raise self._disk_full(new) from e
        finally:
            with self._transaction():  # under the lock, so a concurrent writer's commit is seen
                self._unlink([h for h in written if not self._has_block(h)])

    def _put_locked(self, record, block_hashes, new, evict, written) -> list[str]:
        session_id, tenant, tokens, label, replica = record
        gone = [h for h in dict.fromkeys(block_hashes) if h not in new and not self._has_block(h)]
        if gone:
            raise MissingBlocks(f"{len(gone)} blocks of session {session_id} are neither given nor stored, "
                                f"e.g. {gone[0][:12]}: dropped since the caller looked")
        if self._label_locked(session_id) == PINNED:
            label = PINNED  # the move owns the label until it completes or aborts
        keep = set(block_hashes)
        unlinked = self._forget_session_locked(session_id, keep)
        absent = [h for h in new if not self._has_block(h)]
        need = sum(len(new[h]) for h in absent)
        free = self.capacity_bytes - self.used_bytes()
        dropped: list[str] = []
        if need > free:
            dropped = self._drop_redundant_locked(evict, need - free, session_id, keep, unlinked)
            if need > self.capacity_bytes - self.used_bytes():
                # Rolls the drops back too: dropping for nothing helps no one.
                raise TierFull(need, free, tier="DRAM")
        # Files are only unlinked under this lock, so one written (or found) earlier may have
        # been removed by another writer since: rewrite it now that nobody else can.
        self._write_files({h: new[h] for h in absent}, written)
        self._db.executemany("INSERT INTO blocks VALUES (?, ?)", [(h, len(new[h])) for h in absent])
        self._add_used(need)
        self._db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                         (session_id, tenant, tokens, label, replica, time.time()))
        self._db.executemany("INSERT INTO session_blocks VALUES (?, ?, ?)",
                             [(session_id, pos, h) for pos, h in enumerate(block_hashes)])
        self._unlink(unlinked)
        return dropped

    def _drop_redundant_locked(self, evict: Sequence[str], short: int, writing: str, keep: set[str],
                               unlinked: list[str]) -> list[str]:
        """Drop the named redundant copies, in order, until ``short`` bytes are freed."""
        dropped, start = [], self.used_bytes()
        for victim in dict.fromkeys(evict):
            if start - self.used_bytes() >= short:
                break
            # Re-read under the lock: a move may have pinned it, or made DRAM its home, since.
            if victim != writing and self._label_locked(victim) == REDUNDANT:
                unlinked += self._forget_session_locked(victim, keep)
                dropped.append(victim)
        return dropped

    def set_label(self, session_id: str, label: str) -> bool:
        if label not in LABELS:
            raise ValueError(f"unknown tier label {label!r}; valid: {', '.join(LABELS)}")
        cur = self._db.execute(
            "UPDATE sessions SET label=?, updated=? WHERE session=?", (label, time.time(), session_id)
        )
        return cur.rowcount == 1

    def drop_session(self, session_id: str) -> int:
        """Remove a session; returns the bytes freed. Idempotent."""
        with self._transaction():
            before = self.used_bytes()
            self._unlink(self._forget_session_locked(session_id, keep=set()))
            return before - self.used_bytes()

    def check_integrity(self) -> None:
        """free + used == capacity with used == sum of block sizes (so used <= capacity); every
        block has an owner and a file; every label is a tier label or PINNED."""
        with self._transaction():  # files change only under this lock: a stable view
            self._check_integrity_locked()

    def _check_integrity_locked(self) -> None:
        total = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM blocks").fetchone()[0]
        used = self.used_bytes()
        assert total == used, f"accounting drift: blocks sum {total} != used {used}"
        free = self.capacity_bytes - used
        assert free >= 0 and free + used == self.capacity_bytes, f"over capacity: {used} > {self.capacity_bytes}"
        orphans = self._db.execute(
            "SELECT COUNT(*) FROM blocks WHERE hash NOT IN (SELECT hash FROM session_blocks)"
        ).fetchone()[0]
        assert orphans == 0, f"{orphans} blocks belong to no session"
        labels = {label for (label,) in self._db.execute("SELECT DISTINCT label FROM sessions")}
        assert labels <= set(LABELS), f"unknown labels {sorted(labels - set(LABELS))}"
        for (h,) in self._db.execute("SELECT hash FROM blocks"):
            assert (self.root / "blocks" / h).exists(), f"block {h[:12]} has no file"

    # ---- internals ----
    def _transaction(self):
        return _Immediate(self._db)

    def _label_locked(self, session_id: str) -> str | None:
        row = self._db.execute("SELECT label FROM sessions WHERE session=?", (session_id,)).fetchone()
        return row[0] if row else None

    def _add_used(self, delta: int) -> None:
        self._db.execute("UPDATE meta SET value = value + ? WHERE key='used_bytes'", (delta,))

    def _forget_session_locked(self, session_id: str, keep: set[str]) -> list[str]:
        hashes = [h for (h,) in self._db.execute("SELECT hash FROM session_blocks WHERE session=?", (session_id,))]
        self._db.execute("DELETE FROM session_blocks WHERE session=?", (session_id,))
        self._db.execute("DELETE FROM sessions WHERE session=?", (session_id,))
        freed = []
        for h in set(hashes) - keep:
            if self._db.execute("SELECT 1 FROM session_blocks WHERE hash=? LIMIT 1", (h,)).fetchone() is None:
                (nbytes,) = self._db.execute("SELECT nbytes FROM blocks WHERE hash=?", (h,)).fetchone()
                self._db.execute("DELETE FROM blocks WHERE hash=?", (h,))
                self._add_used(-nbytes)
                freed.append(h)
        return freed

    def _write_files(self, blocks: Mapping[str, bytes], written: list[str]) -> None:
        """Write block files not yet on disk (atomic rename), adding each to ``written``."""
        for h, data in blocks.items():
            path = self.root / "blocks" / h
            if path.exists():
                continue
            tmp = path.with_name(f".{h}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                _write_file(tmp, data)
                tmp.rename(path)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full tmpfs leaves a partial file: never keep it
                raise
            written.append(h)

    def _disk_full(self, new: Mapping[str, bytes]) -> TierFull:
        return TierFull(sum(map(len, new.values())), self.capacity_bytes - self.used_bytes(), tier="DRAM",
                        detail=f"the filesystem under {self.root} is full below the tier's capacity: "
                               "give /dev/shm more room or lower the DRAM tier's capacity")

    def _unlink(self, hashes: Iterable[str]) -> None:
        for h in hashes:
            (self.root / "blocks" / h).unlink(missing_ok=True)


def _write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def write_session(store: DramStore, session_id: str, *, tenant: str, replica: str, label: str, tokens: int,
                  block_hashes: list[str], blocks: Mapping[str, bytes]) -> list[str]:
    """How callers write into the DRAM tier: put; if the chain does not fit, put again
    letting go of redundant copies, least recently written first. Returns the sessions
    dropped; raises TierFull (or MissingBlocks) as `put_session` does, and the caller
    decides what a refusal means.

    The rule every caller follows, because the controller's planner is the only policy:
    its books hold every session it places in DRAM, within the tier's capacity, and do
    not hold the write-through copies of GPU-tier sessions. Hence:
    - a copy the controller books in DRAM ("dram", or "pinned" by a move) is never
      dropped by the data plane; only a move the controller orders removes it;
    - any write may drop redundant "gpu" copies, in any order without touching the
      books: those sessions' KV is in the GPU tier (held in HBM, or, under lru-offload,
      left to the engine's own LRU cache). A later demotion of a session whose copy
      went finds none, and is refused: the books keep it in GPU.
    """
    fields = dict(tenant=tenant, replica=replica, label=label, tokens=tokens, block_hashes=block_hashes, blocks=blocks)
    try:
        return store.put_session(session_id, **fields)
    except TierFull:
        pass
    return store.put_session(session_id, **fields, evict=store.redundant_copies())


class _Immediate:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK: one writer across all processes."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
