"""The shared-token check of Lull's internal gRPC services (the node agents' NodeAgentService).

Who calls: a node agent's server installs ``TokenCheck``; the controller's mover and
anything else that calls an agent opens its channel with ``agent_channel`` (asyncio) or
``blocking_agent_channel``. The token is
``LULL_INTERNAL_TOKEN`` (``proto/config_secrets.internal_token``), the same on every node.

Every RPC is checked, Health included: an agent's readiness probe is a TCP connect, which
needs no call. A call without the token, or with another, is UNAUTHENTICATED and never
reaches the servicer. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import NamedTuple

import grpc

from proto.config_secrets import INTERNAL_TOKEN_ENV, internal_token

METADATA_KEY = "authorization"
_DENIED = f"this call carries no valid internal token (metadata '{METADATA_KEY}: Bearer <{INTERNAL_TOKEN_ENV}>')"


def token_metadata(token: str) -> tuple[tuple[str, str]]:
    """The call metadata that authenticates a call to an internal service."""
    return ((METADATA_KEY, f"Bearer {token}"),)


class TokenCheck(grpc.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, every call whose metadata lacks ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an internal service needs a token to check")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or self._authentic(handler_call_details.invocation_metadata):
            return handler
        return _denial(handler)

    def _authentic(self, metadata) -> bool:
        given = dict(metadata or ()).get(METADATA_KEY, "")
        return hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected)


def _denial(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts UNAUTHENTICATED."""
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    def deny_stream(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # never reached: makes this a generator, as a streaming handler is

    options = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **options)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **options)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **options)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **options)


class _AddToken:
    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(token)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# One class per kind of call: an asyncio channel files each interceptor under its first kind only.
class _AddTokenUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AddTokenStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def agent_channel(address: str, env: Mapping[str, str] | None = None) -> grpc.aio.Channel:
    """An asyncio channel to a node agent whose every call carries this process's token."""
    token = internal_token(env)
    return grpc.aio.insecure_channel(address, interceptors=[_AddTokenUnary(token), _AddTokenStream(token)])


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: object
    wait_for_ready: bool | None
    compression: object


class _AddTokenBlocking(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(token)

    def _details(self, details) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def blocking_agent_channel(address: str, env: Mapping[str, str] | None = None) -> grpc.Channel:
    """A blocking channel to a node agent whose every call carries this process's token."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _AddTokenBlocking(internal_token(env)))
