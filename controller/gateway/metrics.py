"""The gateway's `lull:*` metrics, recorded around `GatewayCore` without changing it.

`MeteredController` and `MeteredEngines` wrap the controller client and the engine
handle that the core calls; `count_rest_requests` is an HTTP middleware and
`CountGrpcRequests` a gRPC server interceptor. Together they record requests by API
and status (the HTTP status code on REST, the gRPC status name on gRPC), time to
first token by the session's tier on arrival, time per output token, and recomputed
prompt tokens.

What the gateway can see bounds what it records:
- TTFT and time per output token come from streamed calls only: a non-streamed call
  returns all its tokens at once, so its first token's time is not observable here
  (vLLM's `vllm:time_to_first_token_seconds` covers those calls inside the engine).
- Recompute tokens come from non-streamed calls, whose result carries the engine's
  cached-token count, and only for sessions whose KV sat outside HBM on arrival
  (dram, shared, waiting): a session in HBM keeps its prefix in vLLM's cache, and a
  gap there is only the last, partial block.
- Arrival is when the core asks for admission (after tokenizing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from controller.runtime.metrics import NEW_SESSION


@dataclass
class _Arrival:
    at: float
    tier: str  # the session's tier on arrival, or NEW_SESSION
    context_tokens: int  # KV the session had on arrival (what a reuse could cover)


class MeteredController:
    """The controller client, with `admit` sent as the actor's `admit_observed`, which
    also returns the session's tier and context on arrival (one call, no extra round
    trip; the client's restart handling applies). Everything else is forwarded."""

    def __init__(self, client, arrivals: dict[str, _Arrival]):
        self._client, self._arrivals = client, arrivals

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    async def admit(self, session_id: str, tenant: str, prompt_tokens: int, max_tokens: int, timeout_s: float):
        arrived = time.monotonic()
        admission, tier, context_tokens = await self._client.admit_observed(
            session_id, tenant, prompt_tokens, max_tokens, timeout_s)
        self._arrivals[session_id] = _Arrival(arrived, tier, context_tokens)
        return admission


class MeteredEngines:
    """The engine replicas (`Engines`), timing each call against its session's arrival."""

    def __init__(self, engines, metrics: dict, arrivals: dict[str, _Arrival]):
        self._engines, self._metrics, self._arrivals = engines, metrics, arrivals

    async def generate(self, replica_id: str, request: dict) -> dict:
        arrival = self._arrivals.pop(request["session_id"], None)
        done = await self._engines.generate(replica_id, request)
        if arrival and arrival.tier not in ("gpu", NEW_SESSION):
            expected = min(len(request["prompt_token_ids"]), arrival.context_tokens)
            recomputed = max(0, expected - done["cached_tokens"])
            if recomputed:
                self._metrics["lull:recompute_tokens"].inc(recomputed)
        return done

    async def stream(self, replica_id: str, request: dict) -> AsyncIterator[list[int]]:
        arrival = self._arrivals.pop(request["session_id"], None)
        first_at = last_at = None
        first_tokens = total = 0
        async for ids in self._engines.stream(replica_id, request):
            if not ids:  # the stream's end marker (workers.engine.StreamEnd): no token, no timing
                yield ids
                continue
            last_at = time.monotonic()
            if first_at is None:
                first_at, first_tokens = last_at, len(ids)
                if arrival:
                    self._metrics["lull:time_to_first_token_seconds"].labels(tier=arrival.tier).observe(
                        first_at - arrival.at)
            total += len(ids)
            yield ids
        if first_at is not None and total > first_tokens:
            self._metrics["lull:time_per_output_token_seconds"].observe((last_at - first_at) / (total - first_tokens))


def count_rest_requests(app, metrics: dict) -> None:
    """Count every answered API request (paths under /v1/) by status code."""

    @app.middleware("http")
    async def _count(request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics["lull:requests"].labels(api="rest", code=str(response.status_code)).inc()
        return response


class CountGrpcRequests(grpc.aio.ServerInterceptor):
    """Count every gRPC call in `lull:requests` with api="grpc" and the name of the status
    it ends with (OK, INVALID_ARGUMENT, ...). Put it first among the server's
    interceptors, so it sees the statuses the others answer with. A call to a method
    the server lacks counts as UNIMPLEMENTED.

    The count comes when the handler finishes; a status sent by `context.abort` can
    reach the client a moment before that."""

    def __init__(self, metrics: dict):
        self._requests = metrics["lull:requests"]

    def _count(self, code: str) -> None:
        self._requests.labels(api="grpc", code=code).inc()

    @contextlib.contextmanager
    def _counted(self, context):
        error = None
        try:
            yield
        except BaseException as raised:  # cancellation included: it ends the call too
            error = raised
            raise
        finally:
            self._count(_status_name(context, error))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            self._count(grpc.StatusCode.UNIMPLEMENTED.name)
            return handler
        if handler.unary_stream is not None or handler.stream_stream is not None:
            kind = "unary_stream" if handler.unary_stream is not None else "stream_stream"
            behavior = getattr(handler, kind)

            async def streamed(request, context):
                with self._counted(context):
                    async for item in behavior(request, context):
                        yield item

            return handler._replace(**{kind: streamed})
        kind = "unary_unary" if handler.unary_unary is not None else "stream_unary"
        behavior = getattr(handler, kind)

        async def unary(request, context):
            with self._counted(context):
                return await behavior(request, context)

        return handler._replace(**{kind: unary})


def _status_name(context, error: BaseException | None) -> str:
    """The gRPC status a call ends with: the code its handler set (`abort`, `set_code`),
    else OK when it returned, CANCELLED or DEADLINE_EXCEEDED when it was cancelled, and
    UNKNOWN when it raised (what gRPC answers for an unhandled exception)."""
    code = context.code()
    if code is not None:
        return code.name
    if error is None:
        return grpc.StatusCode.OK.name
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED).name
    return grpc.StatusCode.UNKNOWN.name
