"""The connector's mover thread: every KV copy and every DRAM-tier read and write, off the engine step.

Who calls: the worker side of `workers.kv_connector.LullConnector`, from the engine
thread, and only to hand work over or take results back: `save` and `load` queue a
request's blocks (with the copy stream's fence) and return at once; `finished` returns
what completed since the last call, never waiting. The thread owns the DRAM store it
opens (`DramStore` is not thread-safe; the scheduler side keeps its own) and does, per
request, one batched copy (`workers.kv_copy`), the seal or check of each block
(`workers.kv_integrity`: fingerprint and CRC) and the store's transaction. Loads go
before saves: a load holds up a request, a save only holds blocks. Every completion
sets `wake`, which the engine thread waits on instead of sleeping. Imports no vLLM.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workers.dram_store import DramStore, MissingBlocks, write_session
from workers.kv_copy import CopyStream
from workers.kv_integrity import BlockRejected, seal, unseal
from workers.tier_errors import TierFull

log = logging.getLogger(__name__)

LOAD, STATS, SAVE, STOP = 0, 1, 2, 3  # queue priorities, lower first: counters stay fresh behind a long save


@dataclass(frozen=True)
class BlockCopy:
    """Blocks of one request to load into, or save from, the engine's KV cache.

    A save names every whole block of the call (`block_ids`, `hashes`: one key per block);
    the mover copies only those the DRAM tier lacks, and files the session's whole chain."""

    req_id: str
    session: str
    tenant: str
    tier: str
    tokens: int
    block_ids: tuple[int, ...]
    hashes: tuple[str, ...]  # one per block id


@dataclass
class Done:
    """One finished save or load, reported to the engine thread."""

    kind: str  # "save" | "load"
    copy: BlockCopy
    stored: bool = False  # save: the write-through landed (False: skipped, `save_refused`)
    blocks: int = 0  # blocks copied (save) or loaded (load)
    nbytes: int = 0
    seconds: float = 0.0
    dropped: int = 0  # save: redundant copies let go to fit
    failed_block_ids: set[int] = field(default_factory=set)  # load: not loaded; vLLM recomputes them
    refused: dict[str, int] = field(default_factory=dict)  # load: "checksum" / "identity" -> blocks


class KvMover:
    def __init__(self, store: DramStore, copier: CopyStream, fingerprint: bytes, replica_id: str,
                 wake: threading.Event):
        self.store, self.copier, self.fingerprint, self.replica_id = store, copier, fingerprint, replica_id
        self.wake = wake
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._done: queue.SimpleQueue[Done] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"lull-kv-mover-{replica_id}", daemon=True)
        self._thread.start()

    # ---- engine thread ----
    def save(self, copy: BlockCopy) -> None:
        self._put(SAVE, ("save", copy, self.copier.fence()))

    def load(self, copy: BlockCopy) -> None:
        self._put(LOAD, ("load", copy, self.copier.fence()))

    def write_stats(self, path: Path, stats: dict) -> None:
        self._put(STATS, ("stats", path, dict(stats)))

    def finished(self) -> list[Done]:
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                return done

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        self._put(STOP, None)
        self._thread.join(timeout)

    def _put(self, priority: int, job) -> None:
        self._jobs.put((priority, next(self._seq), job))

    # ---- mover thread ----
    def _run(self) -> None:
        self.copier.bind_thread()
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            kind, *args = job
            if kind == "stats":
                _write_json(*args)
                continue
            try:
                done = (self._save if kind == "save" else self._load)(*args)
            except Exception:
                log.exception("KV %s of request %s failed", kind, args[0].req_id)
                done = Done(kind, args[0], failed_block_ids=set(args[0].block_ids) if kind == "load" else set())
            self._done.put(done)
            self.wake.set()

    def _save(self, copy: BlockCopy, fence) -> Done:
        started = time.perf_counter()
        missing = set(self.store.missing(copy.hashes))
        todo = [(b, h) for b, h in zip(copy.block_ids, copy.hashes) if h in missing]
        blocks: dict[str, bytes] = {}
        if todo:
            key_of = dict(todo)
            for ids, host in self.copier.gather_chunks([b for b, _ in todo], fence):
                rows = host.numpy()
                for i, b in enumerate(ids):
                    blocks[key_of[b]] = seal(rows[i].tobytes(), self.fingerprint)
        done = Done("save", copy, blocks=len(blocks), nbytes=sum(map(len, blocks.values())))
        done.stored, done.dropped = self._store(copy, blocks)
        done.seconds = time.perf_counter() - started
        return done

    def _store(self, copy: BlockCopy, blocks: dict[str, bytes]) -> tuple[bool, int]:
        """Write through under the DRAM tier's rule (see `LullConnector`): (stored, copies dropped)."""
        label = "gpu"  # every write-through is a redundant GPU-tier copy; only a move books it "dram"
        try:
            dropped = write_session(self.store, copy.session, tenant=copy.tenant, replica=self.replica_id,
                                    label=label, tokens=copy.tokens, block_hashes=list(copy.hashes), blocks=blocks)
            if dropped:
                log.debug("DRAM tier: session %s dropped %d redundant copies to fit", copy.session, len(dropped))
            return True, len(dropped)
        except (TierFull, MissingBlocks) as e:
            log.debug("DRAM tier: write-through of session %s skipped (%d blocks): %s", copy.session, len(blocks), e)
        except Exception:
            log.exception("DRAM tier write-through of session %s failed", copy.session)
        return False, 0

    def _load(self, copy: BlockCopy, fence) -> Done:
        started = time.perf_counter()
        found = self.store.read_blocks(copy.hashes)
        done = Done("load", copy)
        good: list[tuple[int, bytes]] = []
        for block_id, h in zip(copy.block_ids, copy.hashes):
            payload = self._verified(found.get(h), done)
            if payload is not None and len(payload) != self.copier.layout.block_nbytes:
                log.warning("DRAM tier block of %d bytes refused: this model's blocks hold %d",
                            len(payload), self.copier.layout.block_nbytes)
                payload = None
            if payload is None:  # dropped since the scheduler looked, or refused: vLLM recomputes it
                done.failed_block_ids.add(block_id)
            elif not done.failed_block_ids:
                # vLLM keeps a loaded prefix only up to the first failed block and recomputes the
                # rest, so only that prefix is copied in (and counted as loaded).
                good.append((block_id, payload))
        for start in range(0, len(good), self.copier.chunk_blocks):
            chunk = good[start : start + self.copier.chunk_blocks]
            host = self.copier.host_buffer(len(chunk))
            rows = host.numpy()
            for i, (_, payload) in enumerate(chunk):
                rows[i] = np.frombuffer(payload, dtype=np.uint8)
            self.copier.scatter([b for b, _ in chunk], host, fence)
        done.blocks = len(good)
        done.nbytes = sum(len(payload) for _, payload in good)
        done.seconds = time.perf_counter() - started
        return done

    def _verified(self, stored: bytes | None, done: Done) -> bytes | None:
        """The payload of a stored block of this model, or None (counted in `done`) when refused."""
        if stored is None:
            return None
        try:
            return unseal(stored, self.fingerprint)
        except BlockRejected as e:
            reason = "checksum" if e.reason == "checksum" else "identity"
            done.refused[reason] = done.refused.get(reason, 0) + 1
            log.warning("DRAM tier block refused on load (%s): %s; recomputing it", e.reason, e)
            return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data))
        tmp.rename(path)
    except OSError as e:  # counters only: the next write retries
        log.warning("cannot write the connector's counters to %s: %s", path, e)

