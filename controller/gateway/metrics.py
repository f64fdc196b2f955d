"""The gateway's `lull:*` metrics.

`CallMetrics` is what `GatewayCore` records as a call runs; `count_rest_requests` is
an HTTP middleware and `CountGrpcRequests` a gRPC server interceptor. Together they
record requests by API and status (the HTTP status code on REST, the gRPC status name
on gRPC), time to first token by the session's tier on arrival, time per output
token, and recomputed prompt tokens.

What the gateway can see bounds what it records:
- TTFT and time per output token come from streamed calls only: a non-streamed call
  returns all its tokens at once, so its first token's time is not observable here
  (vLLM's `vllm:time_to_first_token_seconds` covers those calls inside the engine).
- Recompute tokens come from non-streamed calls, whose result carries the engine's
  cached-token count, and only for sessions whose KV sat outside HBM on arrival
  (dram, shared, waiting): a session in HBM keeps its prefix in vLLM's cache, and a
  gap there is only the last, partial block.
- Arrival is when the core asks for admission (after tokenizing); the controller's
  answer to `admit` carries the session's tier and context then.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from controller.runtime.metrics import NEW_SESSION


class CallMetrics:
    """Per-call metrics into ``metrics`` (the process's `make_metrics()`); None records nothing."""

    def __init__(self, metrics: dict | None = None):
        self._metrics = metrics

    def first_token(self, admitted, arrived_at: float, now: float) -> None:
        """A streamed call's first token reached the gateway: its time since the call arrived, by the
        session's tier on arrival (the gate's wait included)."""
        if self._metrics is not None:
            self._metrics["lull:time_to_first_token_seconds"].labels(tier=admitted.arrival_tier).observe(
                now - arrived_at)

    def ended(self, admitted, usage, first_at: float | None, ended_at: float) -> None:
        """The call ended with the engine's `CallUsage`. Recomputed prompt tokens: the KV the session
        had on arrival (outside HBM) that the engine did not reuse. Time per output token: after
        the first, for a streamed call."""
        if self._metrics is None:
            return
        if admitted.arrival_tier not in ("gpu", NEW_SESSION):
            recomputed = max(0, min(usage.prompt_tokens, admitted.arrival_context_tokens) - usage.cached_tokens)
            if recomputed:
                self._metrics["lull:recompute_tokens"].inc(recomputed)
        if first_at is not None and usage.output_tokens > 1:
            self._metrics["lull:time_per_output_token_seconds"].observe(
                (ended_at - first_at) / (usage.output_tokens - 1))


def count_rest_requests(app, metrics: dict) -> None:
    """Count every answered API request (paths under /v1/) by status code."""
    app.add_middleware(CountRestRequests, requests=metrics["lull:requests"])


class CountRestRequests:
    """The REST half of `lull:requests`, counted as the response starts. Plain ASGI:
    Starlette's `BaseHTTPMiddleware` runs every request in an extra task."""

    def __init__(self, app, requests) -> None:
        self.app, self._requests = app, requests

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self._requests.labels(api="rest", code=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


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
