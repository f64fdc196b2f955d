"""The OpenAI-compatible REST API of the gateway (FastAPI), over a `GatewayCore`.

Chat and text completions (SSE when `stream` is true), models, health, and the
session endpoints. Every error is OpenAI-shaped JSON: a client's mistake is a
4xx that says what to fix; waiting too long for GPU capacity is a 503 with
Retry-After. Bodies are parsed here, not by FastAPI, so malformed JSON (400)
and a well-formed body with bad fields (422) get distinct, readable errors.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from pydantic import BaseModel, ValidationError

from controller.gateway.protocol import (
    ApiError,
    Authenticator,
    ChatRequest,
    CompletionRequest,
    check_session_id,
    session_id_from,
    session_key,
    validation_message,
)
from controller.gateway.service import CallResult, GatewayCore
from proto.telemetry import tracing

log = logging.getLogger(__name__)


def create_app(core: GatewayCore, auth: Authenticator, model_name: str) -> FastAPI:
    app = FastAPI(title="Lull", docs_url=None, redoc_url=None)
    app.add_middleware(TraceRequests)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(ApiError(500, f"internal error ({type(error).__name__}); the call was not completed",
                                     type="server_error").body(), status_code=500)

    api = _Api(core, auth, model_name)
    _call_routes(app, api)
    _session_routes(app, api)
    return app


class TraceRequests:
    """One span per HTTP request, a child of the caller's W3C traceparent when it sends one.
    Plain ASGI: Starlette's `BaseHTTPMiddleware` runs every request in an extra task."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parent = tracing.extract_context(Headers(scope=scope))
        with tracing.tracer().start_as_current_span(tracing.SPAN_GATEWAY, context=parent,
                                                    attributes={"http.route": scope["path"]}) as span:
            async def sending(message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.status_code", message["status"])
                await send(message)

            await self.app(scope, receive, sending)


class _Api:
    """What every route reads from a request: the tenant, the body, the session key."""

    def __init__(self, core: GatewayCore, auth: Authenticator, model_name: str) -> None:
        self.core, self.auth, self.model_name = core, auth, model_name
        # Opened with POST /v1/sessions but not yet called: the controller learns of a
        # session at its first call, so until then only this gateway knows it exists.
        self.opened: dict[str, float] = {}

    def tenant_of(self, request: Request) -> str:
        return self.auth.tenant(request.headers.get("authorization"))

    def session(self, request: Request, sid: str) -> str:
        return session_key(self.tenant_of(request), check_session_id(sid, "session id"))

    async def parse(self, request: Request, model: type[BaseModel]) -> tuple[Any, dict]:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON ({error.__class__.__name__} at position "
                                f"{getattr(error, 'pos', 0)})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            body = model.model_validate(data)
        except ValidationError as error:
            message, param = validation_message(error.errors(include_input=False))
            raise ApiError(422, message, param=param) from None
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; use {self.model_name!r}",
                           code="model_not_found", param="model")
        return body, data

    def key_for(self, request: Request, tenant: str, data: dict) -> tuple[str, bool]:
        """The controller's session key, and whether the call is a one-off (no session id)."""
        sid = session_id_from(request.headers, data)
        if sid is None:
            return session_key(tenant, f"oneoff-{uuid.uuid4().hex}"), True
        self.opened.pop(session_key(tenant, sid), None)
        return session_key(tenant, sid), False

    async def run(self, request: Request, kind: str):
        core = self.core
        tenant = self.tenant_of(request)
        body, data = await self.parse(request, ChatRequest if kind == "chat" else CompletionRequest)
        try:
            ids = core.chat_prompt(body.template_messages()) if kind == "chat" else core.text_prompt(body.prompt)
        except ValueError as error:
            raise ApiError(400, f"cannot build the prompt: {error}", param="messages") from None
        max_tokens = core.output_limit(len(ids), body.output_limit)
        key, oneoff = self.key_for(request, tenant, data)
        headers = {"x-session-id": key.partition("/")[2]}
        # vLLM's extension: each choice also carries its output token ids.
        token_ids = data.get("return_token_ids") is True
        cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        try:  # a one-off's session closes with its call_finished; only a failed one is closed here
            if body.stream:
                chunks = await core.stream(key, tenant, ids, max_tokens, body.temperature, close=oneoff)
                events = _sse(kind, cid, self.model_name, chunks, len(ids), max_tokens, body.include_usage,
                              core if oneoff else None, key, token_ids)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            result = await core.complete(key, tenant, ids, max_tokens, body.temperature, close=oneoff)
        except BaseException:
            if oneoff:
                await _close_quietly(core, key)
            raise
        return JSONResponse(_response(kind, cid, self.model_name, result, token_ids), headers=headers)


def _call_routes(app: FastAPI, api: _Api) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.run(request, "text")

    @app.get("/v1/models")
    async def models(request: Request):
        api.tenant_of(request)
        return {"object": "list", "data": [{"id": api.model_name, "object": "model", "created": 0,
                                            "owned_by": "lull"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}


def _session_routes(app: FastAPI, api: _Api) -> None:
    @app.post("/v1/sessions")
    async def open_session(request: Request):
        tenant = api.tenant_of(request)
        sid = f"sess-{uuid.uuid4().hex}"
        api.opened[session_key(tenant, sid)] = time.time()
        return {"id": sid, "object": "session"}

    @app.delete("/v1/sessions/{sid}")
    async def close_session(sid: str, request: Request):
        key = api.session(request, sid)
        if api.opened.pop(key, None) is None:
            await api.core.close(key)
        return {"id": sid, "object": "session", "deleted": True}

    @app.post("/v1/sessions/{sid}/tool_call_started")
    async def tool_call_started(sid: str, request: Request):
        await api.core.tool_call(api.session(request, sid), started=True)
        return {"id": sid, "object": "session", "event": "tool_call_started"}

    @app.post("/v1/sessions/{sid}/tool_call_finished")
    async def tool_call_finished(sid: str, request: Request):
        await api.core.tool_call(api.session(request, sid), started=False)
        return {"id": sid, "object": "session", "event": "tool_call_finished"}

    @app.get("/v1/sessions/{sid}")
    async def session_state(sid: str, request: Request):
        key = api.session(request, sid)
        if key in api.opened:
            return {"id": sid, "object": "session", "state": {"phase": "opened", "calls": 0}}
        state = await api.core.session_state(key)
        if state is None:
            raise ApiError(404, f"unknown session {sid!r}", code="session_not_found")
        return {"id": sid, "object": "session", "state": {k: v for k, v in state.items() if k != "session_id"}}


async def _close_quietly(core: GatewayCore, key: str) -> None:
    try:
        await core.close(key)
    except Exception:
        log.warning("could not close one-off session %s", key)


def _usage(prompt: int, completion: int, cached: int | None) -> dict:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _response(kind: str, cid: str, model: str, r: CallResult, token_ids: bool = False) -> dict:
    usage = _usage(r.prompt_tokens, len(r.token_ids), r.cached_tokens)
    extra = {"token_ids": r.token_ids} if token_ids else {}
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                  "logprobs": None, **extra}
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None, **extra}
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage}


async def _sse(kind, cid, model, chunks, prompt_tokens, max_tokens, include_usage, oneoff_core, key,
               token_ids=False):
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def event(choice: dict | None, usage: dict | None = None) -> str:
        payload = {"id": cid, "object": obj, "created": created, "model": model,
                   "choices": [] if choice is None else [choice]}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def choice(text: str, finish: str | None, first: bool = False, ids: list[int] | None = None) -> dict:
        extra = {"token_ids": ids or []} if token_ids else {}
        if kind == "chat":
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None, **extra}

    produced = 0
    try:
        if kind == "chat":
            yield event(choice("", None, first=True))
        async for text, ids in chunks:
            produced += len(ids)
            if text or (token_ids and ids):  # ids without text yet (a split character) still count
                yield event(choice(text, None, ids=ids))
        # The engine's stream carries tokens only: a call that used its whole budget hit the limit.
        yield event(choice("", "length" if produced >= max_tokens else "stop"))
        if include_usage:
            yield event(None, _usage(prompt_tokens, produced, chunks.cached_tokens))
        yield "data: [DONE]\n\n"
    except Exception as error:
        log.warning("stream of session %s failed: %s", key, type(error).__name__)
        yield f"data: {json.dumps(ApiError(500, 'the engine failed during the stream', type='server_error').body())}\n\n"
    finally:
        if oneoff_core is not None and not chunks.finished:  # a finished one-off closed with its call
            await _close_quietly(oneoff_core, key)
