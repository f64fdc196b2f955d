"""The worker side of `workers.kv_connector.LullConnector`, as a plain class (no vLLM import).

Who calls: the connector's worker-side hooks, from vLLM's engine thread, once per step
(`step_started`, `start_loads`, `start_saves`, `finished`, `load_errors`,
`step_ended`). None of them copies a block, touches the DRAM tier or sleeps: loads and
saves go to the mover thread (`workers.kv_mover`), the control file is read by its
watcher thread (`workers.control_watch`), and the stats file is written by the mover.
A finished save or load comes back through `finished`, which vLLM turns into the
request's async completion (blocks freed, or the waiting request scheduled).

Holds: a session labelled "gpu" keeps its blocks after its save lands, until the node
agent releases it (`release <session>`) or the session's next call arrives. A release or
an arrival that comes while the save is still in flight frees the blocks when it lands.

Idle steps: vLLM keeps stepping while it waits for the connector (held blocks, saves or
loads in flight). On such a step with nothing to report, `finished` waits on `wake`,
which the mover and the watcher set, for at most `idle_poll_s`: a release or a finished
copy is reported at once, and an idle engine does not spin a core. The bound remains
because a new request reaches vLLM's input queue, which no connector hook can see.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from workers.connector_control import CONTROL_LOG, STATS_FILE
from workers.control_watch import ControlWatch
from workers.dram_store import DramStore
from workers.kv_copy import DEFAULT_CHUNK_BYTES, CopyStream
from workers.kv_layout import KvLayout
from workers.kv_mover import BlockCopy, Done, KvMover

GPU_TIER = "gpu"
STATS_EVERY_S = 0.5  # how often the busy counter alone rewrites stats.json
GONE_KEEP, GONE_TTL_S = 4096, 600.0  # released sessions remembered (see _gone)


def new_stats() -> dict:
    return {"load_requests": 0, "loaded_tokens": 0, "loaded_bytes": 0, "load_seconds": 0.0,
            "loaded_tokens_dram": 0, "loaded_tokens_shared": 0, "busy_seconds": 0.0, "busy_steps": 0,
            "saved_blocks": 0, "saved_bytes": 0, "save_seconds": 0.0, "save_refused": 0, "released": 0,
            "redundant_dropped": 0, "load_refused_identity": 0, "load_refused_checksum": 0}


class KvWorkerSide:
    def __init__(self, store: DramStore, engine_dir: Path, fingerprint: bytes, replica_id: str, block_size: int,
                 idle_poll_s: float = 0.005, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.store, self.engine_dir, self.fingerprint = store, Path(engine_dir), fingerprint
        self.replica_id, self.block_size = replica_id, block_size
        self.engine_dir.mkdir(parents=True, exist_ok=True)
        self.idle_poll_s, self.chunk_bytes = idle_poll_s, chunk_bytes
        self.wake = threading.Event()
        self.mover: KvMover | None = None
        self.control: ControlWatch | None = None
        self._held: dict[str, tuple[str, int]] = {}  # req_id -> (session, tokens), blocks kept after the call
        self._saving: dict[str, str] = {}  # req_id -> session, save in flight
        self._loading: set[str] = set()
        self._free_on_landing: set[str] = set()  # saves in flight whose session was released or came back
        self._load_errors: set[int] = set()
        # Sessions released by the agent since their last call arrived: a save of theirs queued
        # after the release must free its blocks, not hold them for good.
        self._gone: dict[str, float] = {}
        self._from_shared: set[str] = set()  # sessions staged from the shared tier, not yet loaded
        self._step_started: float | None = None
        self._stats_written = 0.0
        self._dirty = False  # a copy landed since stats.json was last written
        self.stats = new_stats()

    def register(self, layout: KvLayout) -> None:
        """Once, when vLLM hands over its KV cache: start the mover and the control watcher."""
        self.mover = KvMover(self.store, CopyStream(layout, self.chunk_bytes), self.fingerprint, self.replica_id,
                             self.wake)
        self.control = ControlWatch(self.engine_dir / CONTROL_LOG, self.wake)

    # ---- each step, engine thread ----
    def step_started(self, computes_tokens: bool) -> None:
        if computes_tokens:
            self._step_started = time.perf_counter()

    def step_ended(self) -> None:
        if self._step_started is not None:
            self.stats["busy_seconds"] += time.perf_counter() - self._step_started
            self.stats["busy_steps"] += 1
            self._step_started = None

    def start_loads(self, loads: list[BlockCopy]) -> None:
        for load in loads:
            self._loading.add(load.req_id)
            self.mover.load(load)

    def start_saves(self, saves: list[BlockCopy]) -> None:
        for save in saves:
            self._saving[save.req_id] = save.session
            self.mover.save(save)

    def finished(self, arrived: set[str], idle_step: bool) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose blocks vLLM may free, requests whose load landed) since the last step.

        `arrived`: sessions whose new call the scheduler took up this step (their holds go)."""
        self.wake.clear()
        freed, loaded = self._collect(arrived)
        if not (freed or loaded) and idle_step and (self._held or self._saving or self._loading):
            if self.wake.wait(self.idle_poll_s):  # woken by a landing copy or a control line
                self.wake.clear()
                freed, loaded = self._collect(set())
        if self._dirty or freed or time.monotonic() - self._stats_written > STATS_EVERY_S:
            self._write_stats()
        return freed or None, loaded or None

    def load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.mover is not None:
            self.mover.close()

    # ---- internals, engine thread ----
    def _collect(self, arrived: set[str]) -> tuple[set[str], set[str]]:
        released = self._take_control() | arrived
        for session in arrived:  # the session's call is the controller's GPU tier again
            self._gone.pop(session, None)
        self._free_on_landing |= {req for req, session in self._saving.items() if session in released}
        freed: set[str] = set()
        loaded: set[str] = set()
        for done in self.mover.finished():
            self._dirty = True
            if done.kind == "load":
                self._loaded(done)
                loaded.add(done.copy.req_id)
            elif self._saved(done):
                freed.add(done.copy.req_id)
        for req_id, (session, _) in list(self._held.items()):
            if session in released:
                freed.add(req_id)
                del self._held[req_id]
                self.stats["released"] += 1
        return freed, loaded

    def _take_control(self) -> set[str]:
        released = set()
        for verb, session in self.control.take():
            if verb == "release":
                released.add(session)
                self._gone[session] = time.monotonic()
            elif verb == "shared":
                self._from_shared.add(session)
        if len(self._gone) > GONE_KEEP:  # a save lands within steps of its release: old marks can go
            cutoff = time.monotonic() - GONE_TTL_S
            self._gone = {s: t for s, t in self._gone.items() if t > cutoff}
        return released

    def _saved(self, done: Done) -> bool:
        """Book a landed save; True if its blocks are to be freed now (not held)."""
        save = done.copy
        del self._saving[save.req_id]
        if done.stored:
            self.stats["saved_blocks"] += done.blocks
            self.stats["saved_bytes"] += done.nbytes
            self.stats["save_seconds"] += done.seconds
            self.stats["redundant_dropped"] += done.dropped
        else:
            self.stats["save_refused"] += 1
        released = save.req_id in self._free_on_landing or save.session in self._gone
        self._free_on_landing.discard(save.req_id)
        if save.tier == GPU_TIER and not released:
            self._held[save.req_id] = (save.session, save.tokens)
            return False
        return True

    def _loaded(self, done: Done) -> None:
        load = done.copy
        self._loading.discard(load.req_id)
        self._load_errors |= done.failed_block_ids
        for reason, count in done.refused.items():
            self.stats[f"load_refused_{reason}"] += count
        source = "shared" if load.session in self._from_shared else "dram"
        self._from_shared.discard(load.session)  # later loads read what the engine wrote through
        self.stats["load_requests"] += 1
        self.stats["loaded_tokens"] += self.block_size * done.blocks
        self.stats[f"loaded_tokens_{source}"] += self.block_size * done.blocks
        self.stats["loaded_bytes"] += done.nbytes
        self.stats["load_seconds"] += done.seconds

    def _write_stats(self) -> None:
        self._stats_written, self._dirty = time.monotonic(), False
        # The holds themselves (session -> tokens), for the node agent's report: the controller
        # releases a hold its books no longer place here (one a lost release line left).
        held = {session: tokens for session, tokens in self._held.values()}
        self.mover.write_stats(self.engine_dir / STATS_FILE,
                               {**self.stats, "held_requests": len(self._held), "held_sessions": held})
