"""One call through Lull, without HTTP: count -> admit -> forward to the admitted replica -> report.

`GatewayCore` is what the REST and gRPC layers call. It owns no policy and no
protocol: vLLM's own server, on the engine replica, reads the request and writes the
response. The core counts the prompt's tokens with vLLM's rendering, waits for the
controller's admission, forwards the body (with the session's tier label and the
tenant's cache salt) to the replica the controller chose, passes the response
through, and tells the controller how the call ended. A call makes two controller
calls: `admit` and `call_finished` (a failure or a caller who left: `call_failed`).
Prompts never reach a log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.gateway.controller_client import ControllerClient
from controller.gateway.metrics import CallMetrics
from controller.gateway.prompt_counter import INLINE_BODY_BYTES, PromptCounter
from controller.gateway.protocol import ApiError, lull_fields
from controller.gateway.quotas import TenantGate, Ticket
from proto.actor_errors import ACTOR_GONE, cause, is_error
from proto.engine_call import CallUsage, EngineCall
from proto.quotas import Quotas
from proto.telemetry import tracing

__all__ = ["Call", "ControllerClient", "Engines", "Forwarded", "GatewayCore", "Limits"]

log = logging.getLogger(__name__)

# A call whose engine replica died or became unreachable before answering is admitted again
# and retried, for this long: until Ray declares a lost node dead (its health checks take
# up to ~30 s), the controller may admit the retry to the same replica.
ENGINE_RETRY_S = 60.0
ENGINE_RETRY_WAIT_S = 1.0  # before retrying a call whose replica became unreachable
# RayActorError: every actor-death error; MisroutedCall: Serve sent the call elsewhere, its replica having left.
REPLICA_GONE = (*ACTOR_GONE, "RayActorError", "WorkerCrashedError", "MisroutedCall")


class Engines(Protocol):
    """The engine replicas, addressed by replica id (the Serve replica's unique_id)."""

    def http(self, replica_id: str, call: EngineCall) -> AsyncIterator[dict | bytes | CallUsage]: ...

    def departed(self, replica_id: str) -> bool:
        """Serve has dropped this replica (it died or is stopping)."""


def replica_lost(error: BaseException) -> bool:
    """The engine replica died or became unreachable under a call (not an error of the call itself)."""
    return any(is_error(error, name) for name in REPLICA_GONE)


@dataclass(frozen=True)
class Limits:
    max_model_len: int  # prompt + output tokens
    max_prompt_tokens: int
    default_max_tokens: int  # output tokens booked for a request that sets no limit
    gate_timeout_s: float


@dataclass(frozen=True)
class Call:
    """A client's generating request, as the REST or gRPC layer read it."""

    kind: str  # "chat", "completion" or "messages": how vLLM renders it
    path: str
    body: dict[str, Any]
    size: int  # the body's bytes
    key: str  # the controller's session key
    tenant: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # forwarded to vLLM (trace context, anthropic-version, ...)
    arrived_at: float = field(default_factory=time.monotonic)


@dataclass
class Forwarded:
    """vLLM's response: its status and headers, and its body, read with `async for`. Once the body
    is read, the controller has been told how the call ended and `usage` holds the engine's count."""

    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncGenerator[bytes, None]
    usage: CallUsage | None = None
    started: bool = False  # the body's reading began: from then on it reports how the call ended
    on_dropped: Callable[[], Awaitable[None]] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks

    async def dropped(self) -> None:
        """Call when the answer is done with, read or not, else a client that left could leave
        its session's turn and reservation held for good. An answer whose body was never read
        (its client left between the admission and the body's first read: an unstarted
        generator runs no `finally`) closes the engine's stream and reports the call failed.
        A body left mid-way (its client left while a piece was being sent: the body's generator
        stays suspended where it yielded, and its `finally` would wait for the garbage
        collector) is closed, so that its `finally` reports the call now. Idempotent."""
        if not self.started and self.on_dropped is not None:
            self.started = True
            await self.on_dropped()
        await self.chunks.aclose()


class GatewayCore:
    def __init__(self, controller: ControllerClient, engines: Engines, counter: PromptCounter, limits: Limits,
                 metrics: CallMetrics | None = None, quotas: TenantGate | None = None):
        self.controller, self.engines, self.counter, self.limits = controller, engines, counter, limits
        self.metrics = metrics or CallMetrics()
        self.quotas = quotas or TenantGate(Quotas())

    def booked_output(self, call: Call, prompt_tokens: int, client_limit: int | None, prompts: int) -> int:
        """Output tokens to book: the client's limit, or `default_max_tokens` when it sets none (vLLM then
        runs to the end of the window; the books follow the real context when the call ends), times
        the choices (`n`) and prompts, each of which holds its own KV past the shared prompt."""
        lim = self.limits
        if prompt_tokens > lim.max_prompt_tokens * prompts:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this model accepts at most "
                                f"{lim.max_prompt_tokens} prompt tokens (context limit {lim.max_model_len})",
                           code="context_length_exceeded", param="messages")
        per_prompt = prompt_tokens // prompts
        room = max(1, lim.max_model_len - per_prompt)  # vLLM cuts a larger limit to the window's rest
        output = min(client_limit or lim.default_max_tokens, room)
        choices = call.body.get("n") if isinstance(call.body.get("n"), int) and call.body.get("n") > 0 else 1
        return output * choices * prompts

    async def forward(self, call: Call) -> Forwarded:
        """Admit the call, then forward it; errors before the engine's first token raise here (an
        `ApiError` for the client's own, a 429 for a tenant over its quota), so the REST layer can
        still answer with a status. The call counts in its tenant's quota until its answer is read."""
        ticket = self.quotas.enter(call.tenant, call.key)
        if not ticket:  # an unlimited tenant: nothing to give back
            return await self._forward(call)
        try:
            forwarded = await self._forward(call)
        except BaseException:
            ticket.release()
            raise
        forwarded.chunks = _released(forwarded.chunks, ticket)
        weakref.finalize(forwarded, ticket.release)  # an answer dropped unread
        return forwarded

    async def _forward(self, call: Call) -> Forwarded:
        rendered = await self.counter.count(call.kind, call.body, call.size)
        output = self.booked_output(call, rendered.prompt_tokens, rendered.max_tokens, rendered.prompts)
        retry_until = time.monotonic() + ENGINE_RETRY_S
        while True:
            admission = await self._admit(call, rendered.prompt_tokens, output)
            call_id = uuid.uuid4().hex
            span = tracing.tracer().start_span(tracing.SPAN_ENGINE, attributes={
                tracing.ATTR_SESSION: call.key, tracing.ATTR_REPLICA: admission.replica_id})
            engine_call = EngineCall("POST", call.path, await _payload(call, admission.tier_label, call_id),
                                     call.query, _traced(call.headers, span), call_id, admission.replica_id)
            parts = aiter(self.engines.http(admission.replica_id, engine_call))
            try:
                head = await anext(parts)
                first = await anext(parts)  # a stream's first event comes with its first token
                break
            except BaseException as error:
                span.end()
                await _close(parts)
                await self._failed(call.key, admission.replica_id, error)
                if not (replica_lost(error) and time.monotonic() < retry_until):
                    raise
                await self._before_retry(call.key, admission.replica_id, error)
        forwarded = Forwarded(head["status"], head["headers"], None)  # type: ignore[arg-type]
        forwarded.chunks = self._rest(call, admission, parts, first, forwarded, span)
        forwarded.on_dropped = lambda: self._ended_early(call.key, admission.replica_id, parts, span, None)
        return forwarded

    async def _ended_early(self, key: str, replica_id: str, parts, span, failure: BaseException | None) -> None:
        """The call ended before its usage: the engine stream is closed (vLLM aborts the request)
        and the call reported failed; a lost replica (``failure``) is looked at."""
        span.end()
        await _close(parts)
        await self._failed(key, replica_id, failure)

    async def _rest(self, call: Call, admission, parts, first, forwarded: Forwarded, span) -> AsyncIterator[bytes]:
        first_at = time.monotonic()
        if call.body.get("stream"):
            self.metrics.first_token(admission, call.arrived_at, first_at)
        forwarded.started = True  # this generator's `finally` reports how the call ends
        failure: BaseException | None = None
        try:
            part = first
            while not isinstance(part, CallUsage):
                yield part
                part = await anext(parts)
        except StopAsyncIteration:  # the replica ended without its count: treat as a failure
            failure = RuntimeError("the engine's answer ended without its usage")
            raise failure from None
        except BaseException as error:  # the replica failed, or the client went away (cancelled)
            failure = error
            raise
        finally:
            if failure is None:
                span.end()
            else:
                await self._ended_early(call.key, admission.replica_id, parts, span,
                                        None if isinstance(failure, (asyncio.CancelledError, GeneratorExit)) else failure)
        forwarded.usage = part
        if forwarded.status >= 400:  # vLLM refused the request: nothing ran
            await self._failed(call.key, admission.replica_id, None)
            return
        self.metrics.ended(admission, part, first_at if call.body.get("stream") else None, time.monotonic())
        await self._finished(call.key, part.context_tokens or admission.arrival_context_tokens)
        log.info("call session=%s replica=%s tier=%s prompt=%d cached=%d out=%d waited=%.3fs", call.key,
                 admission.replica_id, admission.tier_label, part.prompt_tokens, part.cached_tokens,
                 part.output_tokens, admission.waited_s)

    async def _admit(self, call: Call, prompt_tokens: int, max_tokens: int):
        """`Admitted` once the call may run. A gated request whose controller is killed waits for the
        restarted one (`ControllerClient`); a caller who leaves while gated withdraws its request."""
        with tracing.tracer().start_as_current_span(
                tracing.SPAN_GATE_WAIT, attributes={tracing.ATTR_SESSION: call.key,
                                                    tracing.ATTR_TENANT: call.tenant}) as span:
            try:
                admission = await self.controller.admit(call.key, call.tenant, prompt_tokens, max_tokens,
                                                        self.limits.gate_timeout_s)
            except Exception as error:
                mapped = self._admit_error(error)
                if mapped is error:
                    raise
                raise mapped from None
            span.set_attribute(tracing.ATTR_REPLICA, admission.replica_id)
            span.set_attribute(tracing.ATTR_TIER, admission.tier_label)
            return admission

    def _admit_error(self, error: Exception) -> Exception:
        """The client-facing error of a failed admission (the error itself when it is not the client's)."""
        if is_error(error, "GateTimeout"):
            retry = max(1, math.ceil(self.limits.gate_timeout_s / 4))
            reason = getattr(cause(error), "reason", None) or "waiting for GPU capacity"
            return ApiError(503, f"the call waited {self.limits.gate_timeout_s:g} s at the gate without being "
                                 f"admitted ({reason}); retry after {retry} s",
                            type="overloaded_error", code="gate_timeout", headers={"Retry-After": str(retry)})
        if is_error(error, "SessionClosed"):
            return ApiError(409, "the session was closed while its request waited", code="session_closed")
        if isinstance(error, ValueError):
            return ApiError(400, f"the call cannot be admitted: {cause(error)}", code="too_large")
        return error

    async def _finished(self, key: str, context_tokens: int) -> None:
        """The call's output exists: a controller that cannot record it (restarted meanwhile and
        rebuilt without this call) must not turn the client's answer into an error. Not
        waited for: the client's answer does not wait for the books (`ControllerClient`)."""
        try:
            await self.controller.call_finished(key, context_tokens, False, wait=False)
        except Exception as error:
            log.warning("call_finished for session %s not recorded: %s", key, type(cause(error)).__name__)

    async def _failed(self, key: str, replica_id: str, error: BaseException | None) -> None:
        """The call failed or its caller left. When its replica died or became unreachable under it,
        the controller looks at its replicas before answering (a dead one is drained or removed,
        so a retry's admission goes elsewhere)."""
        lost = replica_id if error is not None and replica_lost(error) else None
        dead = error is not None and (is_error(error, "ActorDiedError") or (
            is_error(error, "MisroutedCall") and self.engines.departed(replica_id)))
        try:
            # The client sends it detached and shielded: a caller who left cannot cancel it.
            await self.controller.call_failed(key, lost, dead)
        except asyncio.CancelledError:  # the caller left: the report, shielded, is still sent
            log.debug("call_failed for session %s continues detached; its caller left", key)
        except BaseException as failed:  # the original error is what the client must see
            log.warning("call_failed for session %s not recorded: %s", key, type(cause(failed)).__name__)

    async def _before_retry(self, key: str, replica_id: str, error: BaseException) -> None:
        log.warning("engine replica %s failed during a call of session %s (%s); retrying on another replica",
                    replica_id, key, type(error).__name__)
        if not is_error(error, "ActorDiedError") and not self.engines.departed(replica_id):
            # Unreachable (Serve cannot tell dead from unreachable): give Serve's router a moment
            # to drop it, so the retry is routed elsewhere.
            await asyncio.sleep(ENGINE_RETRY_WAIT_S)

    # -- sessions --------------------------------------------------------------------------
    async def close(self, key: str) -> None:
        try:
            await self.controller.close_session(key)
        except Exception as error:
            raise _unknown(error, key) from None

    async def tool_call(self, key: str, started: bool) -> None:
        try:
            if started:
                await self.controller.tool_call_started(key)
            else:
                await self.controller.tool_call_finished(key)
        except Exception as error:
            raise _unknown(error, key) from None

    async def session_state(self, key: str) -> dict | None:
        return await self.controller.session_state(key)


async def _released(chunks: AsyncGenerator[bytes, None], ticket: Ticket) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        ticket.release()
        await chunks.aclose()  # (closed early, by `Forwarded.dropped`: the body's own `finally` runs)


async def _payload(call: Call, tier: str, call_id: str) -> bytes:
    body = lull_fields(call.body, call.tenant, call.key, tier, call_id)
    if call.size > INLINE_BODY_BYTES:
        return await asyncio.to_thread(_dumps, body)
    return _dumps(body)


def _traced(headers: tuple[tuple[str, str], ...], span) -> tuple[tuple[str, str], ...]:
    """The client's headers with the engine span's W3C traceparent (vLLM's spans join the call's trace)."""
    from opentelemetry import trace

    injected = tracing.inject_headers(context=trace.set_span_in_context(span))
    kept = tuple((k, v) for k, v in headers if k.lower() not in {name.lower() for name in injected})
    return kept + tuple(injected.items())


def _dumps(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def _close(parts) -> None:
    """Stop an engine stream: a Serve response generator is cancelled (the replica's generator is
    closed, and vLLM aborts the request); a plain async generator (tests) is closed."""
    try:
        if hasattr(parts, "cancel"):
            parts.cancel()
        elif hasattr(parts, "aclose"):
            await parts.aclose()
    except BaseException as error:  # closing a dead replica's stream: nothing more to learn
        log.debug("closing an engine stream: %s", type(error).__name__)


def _unknown(error: Exception, key: str) -> Exception:
    if is_error(error, "UnknownSession"):
        return ApiError(404, f"unknown session {key.partition('/')[2]!r}", code="session_not_found")
    return error
