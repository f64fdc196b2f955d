"""Client-side helpers for tests that drive a live gateway (see live_platform.py): plain HTTP
for what the official `openai` client cannot send, the controller's snapshot, and the
bad-input checks every live platform must pass while it keeps serving."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

import openai
import pytest
import ray

from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE

_DEFAULT = object()


@dataclass(frozen=True)
class RawHttp:
    """`raw(method, path, body, key=...)` -> (status, headers, JSON body) against 127.0.0.1:port,
    with `key` as the bearer key (the default key when left out, none when None)."""

    port: int
    key: str | None = None

    def __call__(self, method: str, path: str, body: bytes | None = None,
                 key: str | None | object = _DEFAULT) -> tuple[int, dict, dict]:
        key = self.key if key is _DEFAULT else key
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        return response.status, dict(response.getheaders()), json.loads(data) if data else {}


def chat(client: openai.OpenAI, session: str, text: str, **kwargs):
    return client.chat.completions.create(model="lull", messages=[{"role": "user", "content": text}],
                                          max_tokens=8, extra_headers={"x-session-id": session}, **kwargs)


def snapshot() -> dict:
    """The controller's books: sessions (tier, replica, node, phase) and tiers."""
    return ray.get(ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE).snapshot.remote())


def check_rest_bad_inputs(client: openai.OpenAI, raw: RawHttp, max_model_len: int) -> None:
    """Malformed JSON, bad fields, an unknown session, a wrong key, a prompt over the context
    limit: each a 4xx that says what is wrong."""
    status, _, body = raw("POST", "/v1/chat/completions", b'{"model": "lull", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, _, body = raw("POST", "/v1/chat/completions", b'{"model": "lull", "messages": "hi"}')
    assert status == 400 and body["error"]["param"].startswith("messages")
    status, _, body = raw("POST", "/v1/sessions/nobody/tool_call_finished")
    assert status == 404 and "unknown session 'nobody'" in body["error"]["message"]
    assert raw("GET", "/v1/sessions/nobody")[0] == 404
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        openai.OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0).models.list()
    assert wrong_key.value.status_code == 401 and "invalid API key" in str(wrong_key.value)
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(client, "long", "word " * (2 * max_model_len))
    assert f"maximum context length is {max_model_len} tokens" in str(too_long.value)  # vLLM's own words


def check_grpc_bad_inputs(port: int, key: str, session_id: str, max_model_len: int) -> None:
    """A wrong key, an empty prompt, an empty session id, a prompt over the context limit,
    an unknown session: each a gRPC status with a message."""
    import grpc

    from proto import session_pb2 as spb
    from proto import session_pb2_grpc

    auth = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        too_long = spb.TokenIds(ids=[5] * (2 * max_model_len))
        bad_calls = [
            (grpc.StatusCode.UNAUTHENTICATED, lambda: stub.OpenSession(
                spb.OpenSessionRequest(), metadata=(("authorization", "Bearer wrong"),), timeout=30)),
            (grpc.StatusCode.INVALID_ARGUMENT, lambda: list(stub.Generate(
                spb.GenerateRequest(session_id=session_id), metadata=auth, timeout=30))),
            (grpc.StatusCode.INVALID_ARGUMENT, lambda: list(stub.Generate(
                spb.GenerateRequest(session_id="", text="hi"), metadata=auth, timeout=30))),
            (grpc.StatusCode.INVALID_ARGUMENT, lambda: list(stub.Generate(
                spb.GenerateRequest(session_id=session_id, token_ids=too_long), metadata=auth, timeout=30))),
            (grpc.StatusCode.NOT_FOUND, lambda: stub.GetSessionState(
                spb.GetSessionStateRequest(session_id="nobody"), metadata=auth, timeout=30)),
        ]
        for code, call in bad_calls:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == code and error.value.details()
