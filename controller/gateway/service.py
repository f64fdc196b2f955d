"""One call through Lull, without HTTP: admit -> engine on the admitted replica -> report.

`GatewayCore` is what the REST layer (and later gRPC) calls. It owns no policy:
the controller decides where and when a session runs; the core tokenizes,
checks limits, waits for admission, calls the engine with the session's tier
label and tells the controller how the call ended. Prompts never reach a log.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from controller.gateway.protocol import ApiError

log = logging.getLogger(__name__)

CONTROLLER_METHODS = ("add_replica", "admit", "call_finished", "call_failed", "tool_call_started", "tool_call_finished",
                      "close_session", "snapshot")


class Engines(Protocol):
    """The engine replicas, addressed by replica id (the Serve replica's unique_id)."""

    async def generate(self, replica_id: str, request: dict) -> dict: ...

    def stream(self, replica_id: str, request: dict) -> AsyncIterator[list[int]]: ...


class ControllerClient:
    """Awaitable calls to the controller: a `ControllerActor` handle or an in-process `LiveController`."""

    def __init__(self, target: Any):
        self._target = target
        self._is_actor = hasattr(getattr(target, "admit", None), "remote")

    def __getattr__(self, name: str):
        if name not in CONTROLLER_METHODS:
            raise AttributeError(name)
        method = getattr(self._target, name)

        async def call(*args, **kwargs):
            if self._is_actor:
                return await method.remote(*args, **kwargs)
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return call


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
        try:
            return await self.controller.admit(key, tenant, prompt_tokens, max_tokens, self.limits.gate_timeout_s)
        except Exception as error:
            if is_error(error, "GateTimeout"):
                retry = max(1, math.ceil(self.limits.gate_timeout_s / 4))
                raise ApiError(503, f"the session waited {self.limits.gate_timeout_s:g} s for GPU capacity "
                                    f"without being admitted; retry after {retry} s",
                               type="overloaded_error", code="gate_timeout",
                               headers={"Retry-After": str(retry)}) from None
            if is_error(error, "SessionClosed"):
                raise ApiError(409, "the session was closed while its request waited", code="session_closed") from None
            if isinstance(error, ValueError):
                raise ApiError(400, f"the call cannot be admitted: {cause(error)}", code="too_large") from None
            raise

    def _request(self, key: str, tenant: str, tier: str, prompt_ids: list[int], max_tokens: int,
                 temperature: float) -> dict:
        return {"prompt_token_ids": prompt_ids, "session_id": key, "tenant": tenant, "tier": tier,
                "max_tokens": max_tokens, "temperature": temperature, "request_id": uuid.uuid4().hex}

    async def complete(self, key: str, tenant: str, prompt_ids: list[int], max_tokens: int,
                       temperature: float) -> CallResult:
        admission = await self._admit(key, tenant, len(prompt_ids), max_tokens)
        started = time.monotonic()
        try:
            request = self._request(key, tenant, admission.tier_label, prompt_ids, max_tokens, temperature)
            done = await self.engines.generate(admission.replica_id, request)
        except BaseException:
            await self._failed(key)
            raise
        await self.controller.call_finished(key, len(prompt_ids) + len(done["token_ids"]))
        log.info("call session=%s replica=%s tier=%s prompt=%d cached=%d out=%d waited=%.3fs engine=%.3fs",
                 key, admission.replica_id, admission.tier_label, len(prompt_ids), done["cached_tokens"],
                 len(done["token_ids"]), admission.waited_s, time.monotonic() - started)
        return CallResult(done["token_ids"], self.decode(done["token_ids"]), len(prompt_ids),
                          done["cached_tokens"], done["finish_reason"], admission.waited_s)

    async def stream(self, key: str, tenant: str, prompt_ids: list[int], max_tokens: int,
                     temperature: float) -> AsyncIterator[tuple[str, list[int]]]:
        """Admit first (errors surface before any byte is sent), then yield (new text, new ids)."""
        admission = await self._admit(key, tenant, len(prompt_ids), max_tokens)
        request = self._request(key, tenant, admission.tier_label, prompt_ids, max_tokens, temperature)
        return self._stream(key, admission.replica_id, request, len(prompt_ids))

    async def _stream(self, key: str, replica_id: str, request: dict, prompt_tokens: int):
        ids: list[int] = []
        text = ""
        try:
            async for chunk in self.engines.stream(replica_id, request):
                ids.extend(chunk)
                # Decode the whole output each time: byte-level BPE may split a character
                # across tokens, so per-chunk decoding would emit broken text.
                full = self.decode(ids)
                if full.startswith(text) and len(full) > len(text) and not full.endswith("\ufffd"):
                    yield full[len(text):], chunk
                    text = full
                else:
                    yield "", chunk
        except BaseException:
            await self._failed(key)
            raise
        if (full := self.decode(ids)) != text and full.startswith(text):
            yield full[len(text):], []
        await self.controller.call_finished(key, prompt_tokens + len(ids))

    async def _failed(self, key: str) -> None:
        try:
            await self.controller.call_failed(key)
        except Exception:  # the original error is what the client must see
            log.exception("call_failed for session %s failed", key)

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
