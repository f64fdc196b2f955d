"""The gateway's REST API (FastAPI): vLLM's own OpenAI and Anthropic endpoints, behind Lull's gate.

Generating requests (`/v1/chat/completions`, `/v1/completions`, `/v1/messages`) are
authenticated, given their session, counted, admitted and forwarded to vLLM's server
on the replica that holds the session (`GatewayCore`); the response is vLLM's, passed
through as it streams. Other vLLM endpoints (models, tokenize, detokenize, Anthropic's
count_tokens, version) go to any replica, ungated. Lull's own: health and the session
endpoints (`rest_sessions`). Errors are OpenAI-shaped, Anthropic-shaped on `/v1/messages`.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers

from controller.gateway.protocol import (
    ApiError,
    Authenticator,
    inferred_session_id,
    refuse_lull_owned,
    session_id_from,
    session_key,
)
from controller.gateway.prompt_counter import INLINE_BODY_BYTES
from controller.gateway.rest_sessions import session_routes
from controller.gateway.service import Call, GatewayCore
from proto.engine_call import UNFORWARDED_HEADERS
from proto.telemetry import tracing

log = logging.getLogger(__name__)

GENERATING = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/messages": "messages"}
UNGATED = {("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize"),
           ("POST", "/v1/messages/count_tokens"), ("GET", "/version")}


def create_app(core: GatewayCore, auth: Authenticator, engines, max_body_bytes: int) -> FastAPI:
    """``engines``: has ``any_http(EngineCall)``, a replica's answer to an ungated request."""
    app = FastAPI(title="Lull", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TraceRequests)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(request.url.path, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(request.url.path, ApiError(
            500, f"internal error ({type(error).__name__}); the call was not completed", type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    session_routes(app, core, auth)
    api = _Api(core, auth, engines, max_body_bytes)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def vllm_routes(path: str, request: Request):
        return await api.route(request)

    return app


def error_response(path: str, error: ApiError) -> JSONResponse:
    body = error.anthropic_body() if path.startswith("/v1/messages") else error.body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


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
    def __init__(self, core: GatewayCore, auth: Authenticator, engines, max_body_bytes: int) -> None:
        self.core, self.auth, self.engines, self.max_body_bytes = core, auth, engines, max_body_bytes

    async def route(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        kind = GENERATING.get(path)
        if kind is None and (method, path) not in UNGATED:
            raise ApiError(404, f"{method} {path} is not served here; Lull serves /v1/chat/completions, "
                                "/v1/completions, /v1/messages, /v1/messages/count_tokens, /v1/models, /tokenize, "
                                "/detokenize and its /v1/sessions API", code="not_found")
        if kind is not None and method != "POST":
            raise ApiError(405, f"{path} takes POST", code="method_not_allowed")
        tenant = self.auth.tenant(request.headers.get("authorization"), request.headers.get("x-api-key"))
        raw = await self._body(request)
        if kind is None:
            from proto.engine_call import EngineCall

            call = EngineCall(method, path, raw, request.url.query, _forwardable(request.headers))
            return await _collected(self.engines.any_http(call))
        body = await _json(raw)
        refuse_lull_owned(body)
        sid = session_id_from(request.headers, body) or inferred_session_id(kind, body)
        call = Call(kind, path, body, len(raw), session_key(tenant, sid), tenant, request.url.query,
                    _forwardable(request.headers))
        forwarded = await self.core.forward(call)
        headers = {"x-session-id": sid}
        if dict(forwarded.headers).get("content-type", "").startswith("text/event-stream"):
            return _Answer(forwarded, _events(forwarded, path, call.key), status_code=forwarded.status,
                           media_type="text/event-stream", headers=headers)
        try:
            content = b"".join([chunk async for chunk in forwarded])
        finally:
            await forwarded.dropped()
        return Response(content, status_code=forwarded.status, headers=headers,
                        media_type=dict(forwarded.headers).get("content-type", "application/json"))

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(int(declared), self.max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(size, self.max_body_bytes)
            chunks.append(chunk)
        return b"".join(chunks)


class _Answer(StreamingResponse):
    """A streamed answer that reports its call however the response ends (`Forwarded.dropped`):
    a client that leaves before the body's first read leaves the body's generator unstarted,
    and one that leaves while a piece is sent leaves it suspended at its yield; either way
    its own `finally` would not run now."""

    def __init__(self, forwarded, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwarded = forwarded

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.forwarded.dropped()


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the body has more than {limit} bytes (gateway.max_body_bytes); got at least {size}",
                    code="request_too_large")


async def _json(raw: bytes) -> dict:
    try:
        data = await asyncio.to_thread(json.loads, raw) if len(raw) > INLINE_BODY_BYTES else json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON ({error.__class__.__name__} at position "
                            f"{getattr(error, 'pos', 0)})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return data


def _forwardable(headers: Headers) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers.items() if k.lower() not in UNFORWARDED_HEADERS)


async def _collected(parts) -> Response:
    """An ungated request's answer: vLLM's status, content type and body."""
    head, chunks = None, []
    async for part in parts:
        if isinstance(part, dict):
            head = part
        elif isinstance(part, bytes):
            chunks.append(part)
    headers = dict(head["headers"])
    return Response(b"".join(chunks), status_code=head["status"],
                    media_type=headers.get("content-type", "application/json"))


async def _events(forwarded, path: str, key: str):
    """vLLM's event stream, passed through; an engine failure mid-stream ends it with an error event
    in the API's own shape (the client sees it; nothing is silently cut)."""
    try:
        async for chunk in forwarded:
            yield chunk
    except Exception as error:
        log.warning("stream of session %s failed: %s", key, type(error).__name__)
        failure = ApiError(500, "the engine failed during the stream; retry the request", type="server_error")
        if path.startswith("/v1/messages"):
            yield f"event: error\ndata: {json.dumps(failure.anthropic_body())}\n\n".encode()
        else:
            yield f"data: {json.dumps(failure.body())}\n\n".encode()
