"""One call through Lull, without HTTP: admit -> engine on the admitted replica -> report.

`GatewayCore` is what the REST and gRPC layers call. It owns no policy: the
controller decides where and when a session runs; the core tokenizes, checks
limits, waits for admission, calls the engine with the session's tier label,
records the call's metrics and tells the controller how the call ended. A call
makes two controller calls: `admit` and `call_finished` (a failure adds
`call_failed`). Prompts never reach a log.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace

from controller.gateway.controller_client import ControllerClient
from controller.gateway.metrics import CallMetrics
from controller.gateway.protocol import ApiError
from proto.actor_errors import ACTOR_GONE, cause, is_error
from proto.engine_request import EngineRequest
from proto.telemetry import tracing

__all__ = ["CallResult", "ControllerClient", "Engines", "GatewayCore", "Limits", "StreamedCall"]

log = logging.getLogger(__name__)

ENGINE_RETRIES = 2  # a call whose engine replica died runs again, on another replica (twice: the router may
# still send the first retry to the dead replica before Serve has noticed its death)
ENGINE_RETRY_WAIT_S = 1.0  # before retrying a call whose replica became unreachable
REPLICA_GONE = (*ACTOR_GONE, "RayActorError", "WorkerCrashedError")  # RayActorError: every actor-death error


class Engines(Protocol):
    """The engine replicas, addressed by replica id (the Serve replica's unique_id)."""

    async def generate(self, replica_id: str, request: EngineRequest) -> dict: ...

    def stream(self, replica_id: str, request: EngineRequest) -> AsyncIterator[list[int]]: ...


def replica_lost(error: BaseException) -> bool:
    """The engine replica died or became unreachable under a call (not an error of the call itself)."""
    return any(is_error(error, name) for name in REPLICA_GONE)


@dataclass(frozen=True)
class Limits:
    max_model_len: int  # prompt + output tokens
    max_prompt_tokens: int
    default_max_tokens: int  # output tokens when the client sets none
    gate_timeout_s: float


@dataclass
class CallResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str | None
    waited_s: float


class StreamedCall:
    """A streamed call: `async for text, ids in call` yields (new text, new token ids). Once
    they are all read, `cached_tokens` holds the prompt tokens whose KV the engine reused,
    as its last chunk reports them (`workers.engine.StreamEnd`: no ids, `cached_tokens`);
    None when the engine sent no such chunk. `finished`: the controller was told the call
    ended (and, for a one-off, that its session closed)."""

    def __init__(self) -> None:
        self.pieces: AsyncIterator[tuple[str, list[int]]] | None = None
        self.cached_tokens: int | None = None
        self.finished = False

    def __aiter__(self) -> AsyncIterator[tuple[str, list[int]]]:
        return self.pieces


class GatewayCore:
    def __init__(self, controller: ControllerClient, engines: Engines, tokenizer: Any, limits: Limits,
                 metrics: CallMetrics | None = None):
        self.controller, self.engines, self.tokenizer, self.limits = controller, engines, tokenizer, limits
        self.metrics = metrics or CallMetrics()
        self.vocab_size = len(tokenizer)  # asked per call otherwise, and not free for every tokenizer

    # -- prompts ---------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            if max(prompt) >= self.vocab_size:
                raise ApiError(400, f"token id {max(prompt)} is outside the vocabulary of {self.vocab_size}",
                               param="prompt")
            return prompt
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def output_limit(self, prompt_tokens: int, requested: int | None) -> int:
        """max_tokens for the call; a prompt that cannot fit is a 400 that names the numbers."""
        lim = self.limits
        if prompt_tokens > lim.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this model accepts at most "
                                f"{lim.max_prompt_tokens} prompt tokens (context limit {lim.max_model_len})",
                           code="context_length_exceeded", param="messages")
        room = lim.max_model_len - prompt_tokens
        if requested is None:
            return min(lim.default_max_tokens, room)
        if requested > room:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens and max_tokens is {requested}: "
                                f"{prompt_tokens + requested} exceeds the context limit of {lim.max_model_len} "
                                f"tokens; lower max_tokens to at most {room}",
                           code="context_length_exceeded", param="max_tokens")
        return requested

    # -- one call --------------------------------------------------------------------------
    async def _admit(self, key: str, tenant: str, prompt_tokens: int, max_tokens: int):
        """(`Admitted`, when the call arrived). A gated request whose controller is killed waits
        for the restarted one (`ControllerClient`)."""
        arrived = time.monotonic()
        with tracing.tracer().start_as_current_span(
                tracing.SPAN_GATE_WAIT, attributes={tracing.ATTR_SESSION: key, tracing.ATTR_TENANT: tenant}) as span:
            try:
                admission = await self.controller.admit(key, tenant, prompt_tokens, max_tokens,
                                                        self.limits.gate_timeout_s)
            except Exception as error:
                mapped = self._admit_error(error)
                if mapped is error:
                    raise
                raise mapped from None
            span.set_attribute(tracing.ATTR_REPLICA, admission.replica_id)
            span.set_attribute(tracing.ATTR_TIER, admission.tier_label)
            return admission, arrived

    def _admit_error(self, error: Exception) -> Exception:
        """The client-facing error of a failed admission (the error itself when it is not the client's)."""
        if is_error(error, "GateTimeout"):
            retry = max(1, math.ceil(self.limits.gate_timeout_s / 4))
            return ApiError(503, f"the session waited {self.limits.gate_timeout_s:g} s for GPU capacity "
                                 f"without being admitted; retry after {retry} s",
                            type="overloaded_error", code="gate_timeout", headers={"Retry-After": str(retry)})
        if is_error(error, "SessionClosed"):
            return ApiError(409, "the session was closed while its request waited", code="session_closed")
        if isinstance(error, ValueError):
            return ApiError(400, f"the call cannot be admitted: {cause(error)}", code="too_large")
        return error

    def _request(self, key: str, tenant: str, tier: str, prompt_ids: list[int], max_tokens: int,
                 temperature: float, span=None) -> EngineRequest:
        context = trace.set_span_in_context(span) if span is not None else None
        headers = dict(tracing.inject_headers(context=context))  # W3C traceparent on to vLLM's trace_headers
        return EngineRequest(prompt_ids, max_tokens, temperature, session_id=key, tenant=tenant, tier=tier,
                             trace_headers=headers or None)

    def _engine_span(self, key: str, replica_id: str):
        return tracing.tracer().start_span(
            tracing.SPAN_ENGINE, attributes={tracing.ATTR_SESSION: key, tracing.ATTR_REPLICA: replica_id})

    async def complete(self, key: str, tenant: str, prompt_ids: list[int], max_tokens: int,
                       temperature: float, close: bool = False) -> CallResult:
        """One call; ``close``: the session ends with it (a one-off)."""
        for retries_left in reversed(range(ENGINE_RETRIES + 1)):
            admission, _ = await self._admit(key, tenant, len(prompt_ids), max_tokens)
            started = time.monotonic()
            span = self._engine_span(key, admission.replica_id)
            try:
                request = self._request(key, tenant, admission.tier_label, prompt_ids, max_tokens, temperature, span)
                done = await self.engines.generate(admission.replica_id, request)
                break
            except BaseException as error:
                await self._failed(key, admission.replica_id, error)
                if not (retries_left and replica_lost(error)):
                    raise
                await self._before_retry(key, admission.replica_id, error)
            finally:
                span.end()
        await self._finished(key, len(prompt_ids) + len(done["token_ids"]), close)
        self.metrics.completed(admission, len(prompt_ids), done["cached_tokens"])
        log.info("call session=%s replica=%s tier=%s prompt=%d cached=%d out=%d waited=%.3fs engine=%.3fs",
                 key, admission.replica_id, admission.tier_label, len(prompt_ids), done["cached_tokens"],
                 len(done["token_ids"]), admission.waited_s, time.monotonic() - started)
        return CallResult(done["token_ids"], self.decode(done["token_ids"]), len(prompt_ids),
                          done["cached_tokens"], done["finish_reason"], admission.waited_s)

    async def stream(self, key: str, tenant: str, prompt_ids: list[int], max_tokens: int,
                     temperature: float, close: bool = False) -> StreamedCall:
        """Admit first (errors surface before any byte is sent), then stream (new text, new ids)."""
        admitted = await self._admit(key, tenant, len(prompt_ids), max_tokens)
        call = StreamedCall()
        call.pieces = self._stream(key, tenant, admitted, prompt_ids, max_tokens, temperature, call, close)
        return call

    async def _stream(self, key: str, tenant: str, admitted: tuple, prompt_ids: list[int], max_tokens: int,
                      temperature: float, call: StreamedCall, close: bool):
        ids: list[int] = []
        text = ""
        retries_left = ENGINE_RETRIES
        admission, arrived = admitted
        while True:
            # After a replica died mid-stream, the retry continues from what was already
            # sent: the prompt plus the tokens so far (greedy output is unchanged by the cut).
            # Started, not made current: a context attached across the yields below would be
            # detached in another task's context. The span is passed on explicitly instead.
            span = self._engine_span(key, admission.replica_id)
            request = self._request(key, tenant, admission.tier_label, prompt_ids + ids, max_tokens - len(ids),
                                    temperature, span)
            timing = self.metrics.stream(admission, arrived)
            try:
                async for chunk in self.engines.stream(admission.replica_id, request):
                    if not chunk:  # the stream's end, with the engine's final numbers when it sends them
                        reused = getattr(chunk, "cached_tokens", None)
                        if reused is not None:  # after a retry, of prompt + ids so far: count the prompt only
                            call.cached_tokens = min(reused, len(prompt_ids))
                        continue
                    timing.tokens(len(chunk))
                    ids.extend(chunk)
                    # Decode the whole output each time: byte-level BPE may split a character
                    # across tokens, so per-chunk decoding would emit broken text.
                    full = self.decode(ids)
                    if full.startswith(text) and len(full) > len(text) and not full.endswith("\ufffd"):
                        yield full[len(text):], chunk
                        text = full
                    else:
                        yield "", chunk
                timing.end()
                break
            except BaseException as error:
                await self._failed(key, admission.replica_id, error)
                if not (retries_left and replica_lost(error)) or len(ids) >= max_tokens:
                    raise
                retries_left -= 1
                await self._before_retry(key, admission.replica_id, error)
                admission, arrived = await self._admit(key, tenant, len(prompt_ids) + len(ids), max_tokens - len(ids))
            finally:
                span.end()
        if (full := self.decode(ids)) != text and full.startswith(text):
            yield full[len(text):], []
        await self._finished(key, len(prompt_ids) + len(ids), close)
        call.finished = True

    async def _finished(self, key: str, context_tokens: int, close: bool) -> None:
        """The call's output exists: a controller that cannot record it (restarted meanwhile and
        rebuilt without this call) must not turn the client's answer into an error. Not
        waited for: the client's answer does not wait for the books (`ControllerClient`)."""
        try:
            await self.controller.call_finished(key, context_tokens, close, wait=False)
        except Exception as error:
            log.warning("call_finished for session %s not recorded: %s", key, type(cause(error)).__name__)

    async def _failed(self, key: str, replica_id: str, error: BaseException) -> None:
        """The call failed. When its replica died or became unreachable under it, the controller
        looks at its replicas before answering (a dead one is drained or removed, so a
        retry's admission goes elsewhere)."""
        lost = replica_id if replica_lost(error) else None
        try:
            await self.controller.call_failed(key, lost, is_error(error, "ActorDiedError"))
        except Exception as failed:  # the original error is what the client must see
            log.warning("call_failed for session %s not recorded: %s", key, type(cause(failed)).__name__)

    async def _before_retry(self, key: str, replica_id: str, error: BaseException) -> None:
        log.warning("engine replica %s failed during a call of session %s (%s); retrying on another replica",
                    replica_id, key, type(error).__name__)
        if not is_error(error, "ActorDiedError"):
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


def _unknown(error: Exception, key: str) -> Exception:
    if is_error(error, "UnknownSession"):
        return ApiError(404, f"unknown session {key.partition('/')[2]!r}", code="session_not_found")
    return error
