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

Capacity is a hard limit: a write that does not fit evicts other sessions in
Lull's order (inactive, then busy, then idle; oldest first within a label) and
is refused if that is not enough. Never LRU alone: the label order comes from
the controller's ranking.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Eviction order of the tier labels: a session whose KV also sits in GPU
# ("busy") loses only a redundant copy; an "idle" session loses its only one.
LABEL_EVICTION_ORDER = {"inactive": 0, "busy": 1, "idle": 2}
PINNED = "pinned"  # mid-move: never evicted until the move completes or aborts
LABELS = (*LABEL_EVICTION_ORDER, PINNED)

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
    if not node_id or "/" in node_id:
        raise ValueError(f"node id {node_id!r} cannot name a folder")
    return str(Path(root) / node_id)


@dataclass(frozen=True)
class DramSession:
    session_id: str
    tenant: str
    tokens: int
    label: str
    replica: str
    block_hashes: tuple[str, ...]
    nbytes: int  # bytes of its blocks, shared ones counted in full


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
    ) -> bool:
        """Store (or replace) a session's chain. Returns False if it cannot fit.

        `blocks` needs only the hashes not stored yet. Other sessions are
        evicted in label order to make room; the session itself never is.
        """
        if label not in LABELS:
            raise ValueError(f"unknown tier label {label!r}; valid: {', '.join(LABELS)}")
        new = {h: blocks[h] for h in dict.fromkeys(block_hashes) if h in blocks}
        written = self._write_files(new)  # outside the lock: the slow part, harmless if unused
        stored = False
        try:
            with self._transaction():
                self._put_locked(session_id, tenant, replica, label, tokens, block_hashes, new)
            stored = True
        except _NoRoom:
            pass
        finally:
            with self._transaction():  # under the lock, so a concurrent writer's commit is seen
                self._unlink([h for h in written if not self._has_block(h)])
        return stored

    def _put_locked(self, session_id, tenant, replica, label, tokens, block_hashes, new) -> None:
        absent = [h for h in new if not self._has_block(h)]
        if any(h not in new and not self._has_block(h) for h in block_hashes):
            # Evicted by another process since the caller looked: the chain cannot be stored whole.
            raise _NoRoom
        need = sum(len(new[h]) for h in absent)
        free = self.capacity_bytes - self.used_bytes()
        unlinked: list[str] = []
        if need > free:
            unlinked = self._evict_locked(need - free, keep=session_id, also_keep=set(block_hashes))
            if need > self.capacity_bytes - self.used_bytes():
                raise _NoRoom  # rolls the evictions back too: evicting for nothing helps no one
        # Files are only unlinked under this lock, so one written (or found) earlier may have
        # been removed by an eviction since: rewrite it now that nobody else can.
        self._write_files({h: new[h] for h in absent})
        self._db.executemany("INSERT INTO blocks VALUES (?, ?)", [(h, len(new[h])) for h in absent])
        self._add_used(need)
        unlinked += self._forget_session_locked(session_id, keep=set(block_hashes))
        self._db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, tenant, tokens, label, replica, time.time()),
        )
        self._db.executemany(
            "INSERT INTO session_blocks VALUES (?, ?, ?)",
            [(session_id, pos, h) for pos, h in enumerate(block_hashes)],
        )
        self._unlink(unlinked)

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
        """used == sum of block sizes <= capacity; every block has an owner and a file."""
        with self._transaction():  # files change only under this lock: a stable view
            self._check_integrity_locked()

    def _check_integrity_locked(self) -> None:
        total = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM blocks").fetchone()[0]
        assert total == self.used_bytes(), f"accounting drift: blocks sum {total} != used {self.used_bytes()}"
        assert total <= self.capacity_bytes, f"DRAM tier over capacity: {total} > {self.capacity_bytes}"
        orphans = self._db.execute(
            "SELECT COUNT(*) FROM blocks WHERE hash NOT IN (SELECT hash FROM session_blocks)"
        ).fetchone()[0]
        assert orphans == 0, f"{orphans} blocks belong to no session"
        for (h,) in self._db.execute("SELECT hash FROM blocks"):
            assert (self.root / "blocks" / h).exists(), f"block {h[:12]} has no file"

    # ---- internals ----
    def _transaction(self):
        return _Immediate(self._db)

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

    def _evict_locked(self, need: int, keep: str, also_keep: set[str]) -> list[str]:
        order = " ".join(f"WHEN '{label}' THEN {rank}" for label, rank in LABEL_EVICTION_ORDER.items())
        victims = self._db.execute(
            f"SELECT session, label FROM sessions WHERE session != ? AND label != ? "
            f"ORDER BY CASE label {order} END, updated",
            (keep, PINNED),
        ).fetchall()
        unlinked: list[str] = []
        start = self.used_bytes()
        for victim, label in victims:
            if start - self.used_bytes() >= need:
                break
            unlinked += self._forget_session_locked(victim, keep=also_keep)
            log.info("DRAM tier evicted session %s (%s) to make room", victim, label)
        return unlinked

    def _write_files(self, blocks: Mapping[str, bytes]) -> list[str]:
        """Write block files not yet on disk (atomic rename); returns those written."""
        written = []
        for h, data in blocks.items():
            path = self.root / "blocks" / h
            if path.exists():
                continue
            tmp = path.with_name(f".{h}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.rename(path)
            written.append(h)
        return written

    def _unlink(self, hashes: Iterable[str]) -> None:
        for h in hashes:
            (self.root / "blocks" / h).unlink(missing_ok=True)


class _NoRoom(Exception):
    """Raised inside a write transaction to roll it back when the session cannot fit."""


class _Immediate:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK: one writer across all processes."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
