"""One call through Lull, without HTTP: admit -> engine on the admitted replica -> report.

`GatewayCore` is what the REST layer (and later gRPC) calls. It owns no policy:
the controller decides where and when a session runs; the core tokenizes,
checks limits, waits for admission, calls the engine with the session's tier
label and tells the controller how the call ended. Prompts never reach a log.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace

from controller.gateway.protocol import ApiError
from proto.telemetry import tracing

log = logging.getLogger(__name__)

CONTROLLER_METHODS = ("add_replica", "remove_replica", "drain_replica", "admit", "admit_observed", "call_finished",
                      "call_failed", "tool_call_started", "tool_call_finished", "close_session", "snapshot",
                      "set_agent", "forget_agent", "agent_nodes")
# How long a call waits for a killed controller to come back (restarted by Ray, or relaunched here).
CONTROLLER_RESTART_WAIT_S = 20.0
ENGINE_RETRIES = 2  # a call whose engine replica died runs again, on another replica (twice: the router may
# still send the first retry to the dead replica before Serve has noticed its death)
ENGINE_RETRY_WAIT_S = 1.0  # before retrying a call whose replica became unreachable
# Errors of a Ray actor that is dead or restarting (the controller, or an engine replica).
ACTOR_GONE = ("ActorDiedError", "ActorUnavailableError")


class Engines(Protocol):
    """The engine replicas, addressed by replica id (the Serve replica's unique_id)."""

    async def generate(self, replica_id: str, request: dict) -> dict: ...

    def stream(self, replica_id: str, request: dict) -> AsyncIterator[list[int]]: ...


class ControllerClient:
    """Awaitable calls to the controller: a `ControllerActor` handle or an in-process `LiveController`.

    With an actor, a call that finds the controller dead or restarting waits for it
    (at most `restart_wait_s`) and is sent again: Ray restarts the actor, or, when it
    was killed for good, this client relaunches it from the options the first one
    was started with. Either way the new controller gets every replica this client
    registered and rebuilds its books from the node agents before it serves a call.
    """

    def __init__(self, target: Any, restart_wait_s: float = CONTROLLER_RESTART_WAIT_S):
        self._target = target
        self._is_actor = hasattr(getattr(target, "admit", None), "remote")
        self.restart_wait_s = restart_wait_s
        self._replicas: dict[str, tuple] = {}  # add_replica args, replayed to a restarted controller
        self._launch: dict | None = None  # the controller's launch options, for a relaunch
        self._recovering = asyncio.Lock()
        self.recoveries = 0

    def __getattr__(self, name: str):
        if name not in CONTROLLER_METHODS:
            raise AttributeError(name)

        async def call(*args, **kwargs):
            if name == "add_replica":
                self._replicas[args[0]] = args
            elif name in ("remove_replica", "drain_replica"):
                self._replicas.pop(args[0], None)
            if not self._is_actor:
                result = getattr(self._target, name)(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result
            deadline = time.monotonic() + self.restart_wait_s
            while True:
                target = self._target
                try:
                    if self._launch is None:
                        self._launch = await target.launch_options.remote()
                    return await getattr(target, name).remote(*args, **kwargs)
                except Exception as error:
                    if not controller_gone(error) or time.monotonic() > deadline:
                        raise
                    log.warning("controller unavailable (%s) during %s; waiting for it", type(error).__name__, name)
                    await self._recover(target, deadline)

        return call

    async def recover(self, deadline: float) -> None:
        """Wait for the controller to be back after `controller_gone` (callers that reach
        the actor by another handle, e.g. a metrics wrapper, call this, then retry)."""
        if self._is_actor:
            await self._recover(self._target, deadline)

    async def _recover(self, failed: Any, deadline: float) -> None:
        """Find the restarted controller (or launch one), give it the replicas, let it rebuild."""
        import ray

        from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE
        from controller.runtime.actor import launch_controller

        async with self._recovering:
            if self._target is not failed:
                return  # another call recovered it meanwhile
            while True:
                await asyncio.sleep(0.2)
                try:
                    handle = await asyncio.to_thread(ray.get_actor, CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
                except ValueError:  # killed for good: the name is free
                    if self._launch is None:
                        raise RuntimeError("the controller is gone and its launch options are unknown") from None
                    options = dict(self._launch)
                    options.pop("shared_tokens", None)
                    handle = launch_controller(options.pop("agents"), detached=True, **options)
                try:
                    await handle.start.remote(list(self._replicas.values()), self._launch.get("shared_tokens")
                                              if self._launch else None)
                except Exception as error:
                    if time.monotonic() > deadline:
                        raise
                    log.warning("controller not back yet (%s)", type(error).__name__)
                    continue
                self._target = handle
                self.recoveries += 1
                log.warning("controller back after a restart; %d replicas re-registered", len(self._replicas))
                return


def controller_gone(error: BaseException) -> bool:
    """The controller actor is dead, restarting, or restarted without its books yet."""
    return any(is_error(error, name) for name in (*ACTOR_GONE, "ControllerNotStarted"))


REPLICA_GONE = (*ACTOR_GONE, "RayActorError", "WorkerCrashedError")  # RayActorError: every actor-death error


def replica_lost(error: BaseException) -> bool:
    """The engine replica died or became unreachable under a call (not an error of the call itself)."""
    return any(is_error(error, name) for name in REPLICA_GONE)


def is_error(error: BaseException, name: str) -> bool:
    """Match by class name: errors from the controller actor arrive as RayTaskError subclasses
    of the original class, and the gateway must not import the controller runtime to catch them."""
    return any(cls.__name__ == name for cls in type(error).__mro__)


def cause(error: BaseException) -> BaseException:
    """The original error behind a RayTaskError (whose str() carries the remote traceback)."""
    return getattr(error, "cause", None) or error


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
    None when the engine sent no such chunk."""

    def __init__(self) -> None:
        self.pieces: AsyncIterator[tuple[str, list[int]]] | None = None
        self.cached_tokens: int | None = None

    def __aiter__(self) -> AsyncIterator[tuple[str, list[int]]]:
        return self.pieces


class GatewayCore:
    def __init__(self, controller: ControllerClient, engines: Engines, tokenizer: Any, limits: Limits):
        self.controller, self.engines, self.tokenizer, self.limits = controller, engines, tokenizer, limits

    # -- prompts ---------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            if max(prompt) >= len(self.tokenizer):
                raise ApiError(400, f"token id {max(prompt)} is outside the vocabulary of {len(self.tokenizer)}",
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
        with tracing.tracer().start_as_current_span(
                tracing.SPAN_GATE_WAIT, attributes={tracing.ATTR_SESSION: key, tracing.ATTR_TENANT: tenant}) as span:
            admission = await self._admit_untraced(key, tenant, prompt_tokens, max_tokens)
            span.set_attribute(tracing.ATTR_REPLICA, admission.replica_id)
            span.set_attribute(tracing.ATTR_TIER, admission.tier_label)
            return admission

    async def _admit_untraced(self, key: str, tenant: str, prompt_tokens: int, max_tokens: int):
        deadline = time.monotonic() + CONTROLLER_RESTART_WAIT_S
        while True:
            try:
                return await self.controller.admit(key, tenant, prompt_tokens, max_tokens,
                                                   self.limits.gate_timeout_s)
            except Exception as error:
                # A gated request whose controller was killed waits for the restarted one.
                if not (controller_gone(error) and time.monotonic() < deadline and hasattr(self.controller, "recover")):
                    mapped = self._admit_error(error)
                    if mapped is error:
                        raise
                    raise mapped from None
                log.warning("controller unavailable (%s) while admitting session %s; waiting for it",
                            type(error).__name__, key)
                await self.controller.recover(deadline)

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
                 temperature: float, span=None) -> dict:
        request = {"prompt_token_ids": prompt_ids, "session_id": key, "tenant": tenant, "tier": tier,
                   "max_tokens": max_tokens, "temperature": temperature, "request_id": uuid.uuid4().hex}
        context = trace.set_span_in_context(span) if span is not None else None
        headers = dict(tracing.inject_headers(context=context))  # W3C traceparent on to vLLM's trace_headers
        if headers:
            request["trace_headers"] = headers
        return request

    def _engine_span(self, key: str, replica_id: str):
        return tracing.tracer().start_span(
            tracing.SPAN_ENGINE, attributes={tracing.ATTR_SESSION: key, tracing.ATTR_REPLICA: replica_id})

    async def complete(self, key: str, tenant: str, prompt_ids: list[int], max_tokens: int,
                       temperature: float) -> CallResult:
        for retries_left in reversed(range(ENGINE_RETRIES + 1)):
            admission = await self._admit(key, tenant, len(prompt_ids), max_tokens)
            started = time.monotonic()
            try:
                span = self._engine_span(key, admission.replica_id)
                try:
                    request = self._request(key, tenant, admission.tier_label, prompt_ids, max_tokens,
                                            temperature, span)
                    done = await self.engines.generate(admission.replica_id, request)
                finally:
                    span.end()
                break
            except BaseException as error:
                await self._failed(key)
                if not (retries_left and replica_lost(error)):
                    raise
                await self._replica_died(key, admission.replica_id, error)
        await self._finished(key, len(prompt_ids) + len(done["token_ids"]))
        log.info("call session=%s replica=%s tier=%s prompt=%d cached=%d out=%d waited=%.3fs engine=%.3fs",
                 key, admission.replica_id, admission.tier_label, len(prompt_ids), done["cached_tokens"],
                 len(done["token_ids"]), admission.waited_s, time.monotonic() - started)
        return CallResult(done["token_ids"], self.decode(done["token_ids"]), len(prompt_ids),
                          done["cached_tokens"], done["finish_reason"], admission.waited_s)

    async def stream(self, key: str, tenant: str, prompt_ids: list[int], max_tokens: int,
                     temperature: float) -> StreamedCall:
        """Admit first (errors surface before any byte is sent), then stream (new text, new ids)."""
        admission = await self._admit(key, tenant, len(prompt_ids), max_tokens)
        call = StreamedCall()
        call.pieces = self._stream(key, tenant, admission, prompt_ids, max_tokens, temperature, call)
        return call

    async def _stream(self, key: str, tenant: str, admission: Any, prompt_ids: list[int], max_tokens: int,
                      temperature: float, call: StreamedCall):
        ids: list[int] = []
        text = ""
        retries_left = ENGINE_RETRIES
        while True:
            # After a replica died mid-stream, the retry continues from what was already
            # sent: the prompt plus the tokens so far (greedy output is unchanged by the cut).
            # Started, not made current: a context attached across the yields below would be
            # detached in another task's context. The span is passed on explicitly instead.
            span = self._engine_span(key, admission.replica_id)
            request = self._request(key, tenant, admission.tier_label, prompt_ids + ids, max_tokens - len(ids),
                                    temperature, span)
            try:
                async for chunk in self.engines.stream(admission.replica_id, request):
                    if not chunk:  # the stream's end, with the engine's final numbers when it sends them
                        reused = getattr(chunk, "cached_tokens", None)
                        if reused is not None:  # after a retry, of prompt + ids so far: count the prompt only
                            call.cached_tokens = min(reused, len(prompt_ids))
                        continue
                    ids.extend(chunk)
                    # Decode the whole output each time: byte-level BPE may split a character
                    # across tokens, so per-chunk decoding would emit broken text.
                    full = self.decode(ids)
                    if full.startswith(text) and len(full) > len(text) and not full.endswith("\ufffd"):
                        yield full[len(text):], chunk
                        text = full
                    else:
                        yield "", chunk
                break
            except BaseException as error:
                await self._failed(key)
                if not (retries_left and replica_lost(error)) or len(ids) >= max_tokens:
                    raise
                retries_left -= 1
                await self._replica_died(key, admission.replica_id, error)
                admission = await self._admit(key, tenant, len(prompt_ids) + len(ids), max_tokens - len(ids))
            finally:
                span.end()
        if (full := self.decode(ids)) != text and full.startswith(text):
            yield full[len(text):], []
        await self._finished(key, len(prompt_ids) + len(ids))

    async def _replica_died(self, key: str, replica_id: str, error: BaseException) -> None:
        """The engine replica died under the call: the controller forgets it (its sessions
        come back elsewhere, KV from DRAM/shared or recomputed) and the call runs again."""
        log.warning("engine replica %s failed during a call of session %s (%s); retrying on another replica",
                    replica_id, key, type(error).__name__)
        if is_error(error, "ActorDiedError"):  # dead for good: Serve starts a replica with a new id
            try:
                await self.controller.remove_replica(replica_id)
            except Exception as gone:  # another call (or the gateway's replica sync) removed it first
                log.info("replica %s already removed (%s)", replica_id, type(gone).__name__)
        else:
            # Unreachable (Serve cannot tell dead from unreachable): give Serve's router a moment
            # to drop it, so the retry is routed elsewhere; the gateway's sync removes it if gone.
            await asyncio.sleep(ENGINE_RETRY_WAIT_S)

    async def _finished(self, key: str, context_tokens: int) -> None:
        """The call's output exists: a controller that cannot record it (restarted meanwhile and
        rebuilt without this call) must not turn the client's answer into an error."""
        try:
            await self.controller.call_finished(key, context_tokens)
        except Exception as error:
            log.warning("call_finished for session %s not recorded: %s", key, type(cause(error)).__name__)

    async def _failed(self, key: str) -> None:
        try:
            await self.controller.call_failed(key)
        except Exception as error:  # the original error is what the client must see
            log.warning("call_failed for session %s not recorded: %s", key, type(cause(error)).__name__)

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
        return find_session(await self.controller.snapshot(), key)


def _unknown(error: Exception, key: str) -> Exception:
    if is_error(error, "UnknownSession"):
        return ApiError(404, f"unknown session {key.partition('/')[2]!r}", code="session_not_found")
    return error


def find_session(snapshot: dict, key: str) -> dict | None:
    """The session's entry in the controller's snapshot (`sessions` as a list of dicts or a dict by id)."""
    sessions = snapshot.get("sessions", [])
    if isinstance(sessions, dict):
        entry = sessions.get(key)
        return None if entry is None else {"session_id": key, **entry}
    return next((s for s in sessions if s.get("session_id") == key), None)
