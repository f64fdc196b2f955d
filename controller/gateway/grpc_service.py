"""The public gRPC SessionService (proto/session.proto) over the same `GatewayCore` as REST.

Auth: `authorization: Bearer <key>` in the call's metadata, as on REST. Every
bad input is a gRPC status with a message (INVALID_ARGUMENT, NOT_FOUND,
UNAUTHENTICATED, RESOURCE_EXHAUSTED for a gate timeout); no input reaches the
controller unchecked, and no prompt text reaches a log. Every call is counted in
`lull:requests` with api="grpc" and its status name.
"""

from __future__ import annotations

import json
import logging
import uuid

import grpc

from controller.gateway.protocol import ApiError, Authenticator, check_session_id, session_key
from controller.gateway.service import Call, GatewayCore
from controller.gateway.metrics import CountGrpcRequests
from proto.telemetry.metrics import make_metrics
from proto import session_pb2 as pb
from proto import session_pb2_grpc as pb_grpc
from proto import tiers_pb2
from proto.tiers import Tier

log = logging.getLogger(__name__)

STATUS_OF_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 413: grpc.StatusCode.INVALID_ARGUMENT,
                  404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
                  429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.RESOURCE_EXHAUSTED}
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
PHASES = {"llm": tiers_pb2.PHASE_LLM, "tool": tiers_pb2.PHASE_TOOL, "gated": tiers_pb2.PHASE_GATED}


class SessionServicer(pb_grpc.SessionServiceServicer):
    def __init__(self, core: GatewayCore, auth: Authenticator, model_name: str):
        self.core, self.auth, self.model_name = core, auth, model_name

    async def _tenant(self, context) -> str:
        metadata = dict(context.invocation_metadata() or ())
        try:
            return self.auth.tenant(metadata.get("authorization"), metadata.get("x-api-key"))
        except ApiError as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.message)

    async def _key(self, session_id: str, context) -> str:
        tenant = await self._tenant(context)
        try:
            return session_key(tenant, check_session_id(session_id, "session_id"))
        except ApiError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

    async def _abort(self, error: ApiError, context):
        if retry := error.headers.get("Retry-After"):
            context.set_trailing_metadata((("retry-after", retry),))  # seconds, as REST's header
        await context.abort(STATUS_OF_HTTP.get(error.status, grpc.StatusCode.INTERNAL), error.message)

    async def OpenSession(self, request, context):
        tenant = await self._tenant(context)
        if request.tenant and request.tenant != tenant:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"tenant {request.tenant!r} does not match the API key's tenant")
        if request.HasField("session_id"):
            try:
                check_session_id(request.session_id, "session_id")
            except ApiError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            return pb.OpenSessionResponse(session_id=request.session_id, created=False)
        return pb.OpenSessionResponse(session_id=f"sess-{uuid.uuid4().hex}", created=True)

    async def Generate(self, request, context):
        """A text completion through vLLM's own server, streamed back as `GenerateChunk`s."""
        key = await self._key(request.session_id, context)
        tenant = key.partition("/")[0]
        try:
            forwarded = await self.core.forward(self._call(request, key, tenant))
            if forwarded.status >= 400:
                raise _engine_refusal(forwarded.status, b"".join([chunk async for chunk in forwarded]))
        except ApiError as error:
            await self._abort(error, context)
        finish, usage = None, {}
        try:
            async for event in sse_events(forwarded):
                for choice in event.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
                    if choice.get("text") or choice.get("token_ids"):
                        yield pb.GenerateChunk(text=choice.get("text") or "", token_ids=choice.get("token_ids") or [])
                usage = event.get("usage") or usage
        finally:
            await forwarded.dropped()  # a caller gone before or during the stream: the call is reported
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        yield pb.GenerateChunk(finish_reason=FINISH.get(finish, FINISH["stop"]), usage=pb.Usage(
            prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
            cached_prompt_tokens=cached))

    def _call(self, request, key: str, tenant: str) -> Call:
        """The request as vLLM's /v1/completions body (streamed, with token ids and usage)."""
        if request.WhichOneof("prompt") == "text" and request.text:
            prompt: str | list[int] = request.text
        elif request.WhichOneof("prompt") == "token_ids" and request.token_ids.ids:
            prompt = list(request.token_ids.ids)
        else:
            raise ApiError(400, "the prompt is empty: set text or token_ids")
        sampling = request.sampling
        body = {"model": self.model_name, "prompt": prompt, "stream": True, "return_token_ids": True,
                "stream_options": {"include_usage": True},
                "temperature": sampling.temperature if sampling.HasField("temperature") else 0.0}
        if sampling.HasField("max_tokens"):
            body["max_tokens"] = sampling.max_tokens
        size = len(request.text) if isinstance(prompt, str) else 8 * len(prompt)
        return Call("completion", "/v1/completions", body, size, key, tenant,
                    headers=(("content-type", "application/json"),))

    async def ToolCallStarted(self, request, context):
        return pb.ToolCallStartedResponse(applied=await self._tool_call(request, context, True),
                                          phase=tiers_pb2.PHASE_TOOL)

    async def ToolCallFinished(self, request, context):
        return pb.ToolCallFinishedResponse(applied=await self._tool_call(request, context, False),
                                           phase=tiers_pb2.PHASE_TOOL)

    async def _tool_call(self, request, context, started: bool) -> bool:
        key = await self._key(request.session_id, context)
        try:
            await self.core.tool_call(key, started=started)
        except ApiError as error:
            await self._abort(error, context)
        return True

    async def CloseSession(self, request, context):
        key = await self._key(request.session_id, context)
        try:
            await self.core.close(key)
        except ApiError as error:
            if error.status != 404:
                await self._abort(error, context)
            return pb.CloseSessionResponse(was_open=False)
        return pb.CloseSessionResponse(was_open=True)

    async def GetSessionState(self, request, context):
        key = await self._key(request.session_id, context)
        state = await self.core.session_state(key)
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {request.session_id!r}")
        return pb.SessionState(
            session_id=request.session_id, tenant=key.partition("/")[0],
            location=tiers_pb2.KvLocation(tier=_tier_pb(state.get("tier")),
                                          replica_id=str(state.get("replica") or "")),
            phase=PHASES.get(str(state.get("phase", "")).lower(), 0),
            idleness=float(state.get("idleness", 0.0)), kv_tokens=int(state.get("kv_tokens", 0) or 0))


def _tier_pb(label) -> int:
    """The wire value of a tier label; TIER_UNSPECIFIED for none."""
    try:
        return Tier.from_label(str(label or "").lower()).pb
    except ValueError:
        return tiers_pb2.TIER_UNSPECIFIED


class _Undecodable:
    """A request whose bytes are not the method's message (gRPC would answer UNKNOWN)."""


async def sse_events(chunks):
    """The JSON events of an OpenAI event stream (``data: {...}`` lines), as dicts."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                    yield json.loads(line[6:])


def _engine_refusal(status: int, body: bytes) -> ApiError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"the engine refused the request (HTTP {status})"
    return ApiError(status, message)


class RejectUndecodable(grpc.aio.ServerInterceptor):
    """Answer a request that does not parse as its message with INVALID_ARGUMENT, not UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def tolerant(data: bytes):
            try:
                return parse(data)
            except Exception:  # DecodeError, or bytes that are not valid UTF-8 in a string field
                return _Undecodable()

        message = f"the request is not a valid {handler_call_details.method.rpartition('/')[2]} message"
        if handler.unary_stream is not None:
            behavior = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                async for item in behavior(request, context):
                    yield item

            return handler._replace(request_deserializer=tolerant, unary_stream=unary_stream)
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                return await behavior(request, context)

            return handler._replace(request_deserializer=tolerant, unary_unary=unary_unary)
        return handler


def session_server(core: GatewayCore, auth: Authenticator, metrics: dict, model_name: str,
                   max_concurrent: int | None = None) -> grpc.aio.Server:
    """A grpc.aio server with SessionService, not yet bound or started. Every call is
    counted in ``metrics``' `lull:requests` (api="grpc"), undecodable requests included.
    ``max_concurrent``: calls in flight past which gRPC answers RESOURCE_EXHAUSTED."""
    server = grpc.aio.server(interceptors=[CountGrpcRequests(metrics), RejectUndecodable()],
                             maximum_concurrent_rpcs=max_concurrent)
    pb_grpc.add_SessionServiceServicer_to_server(SessionServicer(core, auth, model_name), server)
    return server


async def start_grpc(core: GatewayCore, auth: Authenticator, port: int, model_name: str, host: str = "0.0.0.0",
                     metrics: dict | None = None, max_concurrent: int | None = None) -> grpc.aio.Server:
    """Serve SessionService on host:port from the running event loop. ``metrics``: the
    process's `make_metrics()` when None, the same objects the REST middleware counts in."""
    server = session_server(core, auth, make_metrics() if metrics is None else metrics, model_name, max_concurrent)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"cannot bind the gRPC session service to {host}:{port}; is the port in use?")
    await server.start()
    log.info("gRPC session service on port %d", port)
    return server
