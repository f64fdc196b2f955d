"""The REST gateway's request rules without Ray: session-id extraction, API-key auth, body errors.

The HTTP tests run the real FastAPI app over the real `LiveController` (no
moves: nothing here exceeds a tier) and the tiny model's real tokenizer; only
the engine is a stub that echoes the prompt's last tokens, since starting vLLM
takes half a minute (the engine path is covered by tests/integration/test_gateway_e2e.py).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from starlette.datastructures import Headers

from proto.config import Secrets
from controller.gateway.protocol import ANONYMOUS_TENANT, ApiError, Authenticator, session_id_from
from controller.gateway.rest import create_app
from controller.gateway.controller_client import ControllerClient
from controller.gateway.service import GatewayCore, Limits
from controller.runtime.actor import Controller
from controller.runtime.live import LiveController
from proto.engine_request import EngineRequest
from workers.engine import StreamEnd


def test_session_id_sources_in_order():
    body = {"session_id": "from-body", "user": "from-user"}
    assert session_id_from(Headers({"X-Session-Id": "h1", "x-claude-code-session-id": "h2"}), body) == "h1"
    assert session_id_from(Headers({"x-claude-code-session-id": "h2"}), body) == "h2"
    assert session_id_from(Headers({}), body) == "from-body"
    assert session_id_from(Headers({}), {"user": "from-user"}) == "from-user"
    assert session_id_from(Headers({}), {}) is None
    with pytest.raises(ApiError, match="printable"):
        session_id_from(Headers({"x-session-id": "   "}), {})
    with pytest.raises(ApiError, match="must be a string"):
        session_id_from(Headers({}), {"session_id": 7})


def test_auth_maps_keys_to_tenants_and_refuses_wrong_or_missing_keys():
    auth = Authenticator(Secrets(api_keys={"acme": "k-acme", "beta": "k-beta"}))
    assert auth.tenant("Bearer k-beta") == "beta" and auth.tenant("bearer  k-acme ") == "acme"
    for header in (None, "", "Bearer nope", "Basic k-acme", "Bearer"):
        with pytest.raises(ApiError) as refused:
            auth.tenant(header)
        assert refused.value.status == 401 and refused.value.type == "authentication_error"
        assert "k-" not in refused.value.message  # never echo a key
    open_platform = Authenticator(Secrets())
    assert open_platform.tenant(None) == ANONYMOUS_TENANT
    with pytest.raises(ApiError):
        open_platform.tenant("Bearer guessed")
    with pytest.raises(ApiError, match="missing API key"):
        Authenticator(Secrets(), required=True).tenant(None)


class EchoEngines:
    """Stub engines: the output is the prompt's last `max_tokens` ids."""

    def __init__(self):
        self.calls = []

    async def generate(self, replica_id, request: EngineRequest):
        self.calls.append((replica_id, request.session_id, request.tenant, request.tier))
        self.trace_headers = request.trace_headers
        out = request.prompt_token_ids[-request.max_tokens:]
        return {"token_ids": out, "text": "", "prompt_tokens": len(request.prompt_token_ids),
                "cached_tokens": 0, "finish_reason": "length", "replica_id": replica_id}

    async def stream(self, replica_id, request):
        done = await self.generate(replica_id, request)
        for token in done["token_ids"]:
            yield [token]


class NoMoves:
    async def move(self, move, src_node, dst_node):
        return False

    async def release(self, session_id, where, node):
        return True


class CountingController:
    """An in-process controller that records every call the gateway makes to it."""

    def __init__(self, target):
        self.target, self.calls = target, []

    def __getattr__(self, name):
        method = getattr(self.target, name)

        async def call(*args):
            self.calls.append(name)
            return await method(*args)

        return call


@pytest.fixture
def client():
    from transformers import AutoTokenizer

    from workers.tiny_model import ensure_tiny_model

    live = LiveController(NoMoves())
    live.add_replica("r1", "node-1", 4096, 4096)
    engines = EchoEngines()
    controller = CountingController(Controller(live))
    core = GatewayCore(ControllerClient(controller), engines, AutoTokenizer.from_pretrained(ensure_tiny_model()),
                       Limits(max_model_len=512, max_prompt_tokens=511, default_max_tokens=4, gate_timeout_s=1))
    app = create_app(core, Authenticator(Secrets(api_keys={"acme": "k-acme"})), "lull")
    with TestClient(app, headers={"authorization": "Bearer k-acme"}) as http:
        http.engines, http.live, http.controller = engines, live, controller
        yield http


def chat_body(text="hello", **extra):
    return {"model": "lull", "messages": [{"role": "user", "content": text}], **extra}


def test_chat_call_flows_through_admit_and_reports_the_context(client):
    reply = client.post("/v1/chat/completions", json=chat_body(), headers={"x-session-id": "s1"})
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert client.engines.calls == [("r1", "acme/s1", "acme", "gpu")]
    session = client.get("/v1/sessions/s1").json()["state"]
    assert session["tier"] == "gpu" and session["kv_tokens"] == usage["total_tokens"]
    assert client.post("/v1/sessions/s1/tool_call_started").status_code == 200
    assert client.delete("/v1/sessions/s1").status_code == 200


def test_streaming_sends_sse_chunks_and_done(client):
    with client.stream("POST", "/v1/completions", json={"model": "lull", "prompt": "import os", "stream": True,
                                                         "stream_options": {"include_usage": True}}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert '"completion_tokens": 4' in lines[-2]


def test_streamed_usage_reports_the_cached_tokens_the_engine_sends_last(client, monkeypatch):
    echo = client.engines.stream

    async def stream_with_end(replica_id, request):
        async for ids in echo(replica_id, request):
            yield ids
        yield StreamEnd(3)

    body = chat_body(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-session-id": "su"}) as reply:
        plain = [json.loads(line[6:]) for line in reply.iter_lines() if line and line != "data: [DONE]"]
    assert "prompt_tokens_details" not in plain[-1]["usage"]  # the engine did not say: no number made up
    monkeypatch.setattr(client.engines, "stream", stream_with_end)
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-session-id": "su"}) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line and line != "data: [DONE]"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert events[-1]["usage"]["completion_tokens"] == 4
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [e["choices"][0]["delta"] for e in plain[:-1]]


def test_return_token_ids_adds_output_ids_to_choices_and_stream_chunks(client):
    """vLLM's `return_token_ids` extension: what `lull bench` reads to grow an agent's context."""
    body = {"model": "lull", "prompt": [40, 41, 42, 43, 44, 45], "max_tokens": 3, "return_token_ids": True}
    done = client.post("/v1/completions", json=body, headers={"x-session-id": "ids"}).json()
    assert done["choices"][0]["token_ids"] == [43, 44, 45]  # the echo engine returns the prompt's tail
    plain = client.post("/v1/completions", json={**body, "return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line and line != "data: [DONE]"]
    streamed = [t for e in events for c in e["choices"] for t in c["token_ids"]]
    assert streamed == [43, 44, 45]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("session", ["counted", None])
def test_a_call_makes_two_controller_calls_admit_and_finished(client, stream, session):
    """A one-off's session closes with its call_finished: no third call."""
    client.controller.calls.clear()
    headers = {"x-session-id": session} if session else {}
    reply = client.post("/v1/chat/completions", json=chat_body(stream=stream), headers=headers)
    assert reply.status_code == 200, reply.text
    assert client.controller.calls == ["admit", "call_finished"]
    if session is None:
        assert client.live.snapshot()["sessions"] == []


def test_one_off_calls_leave_no_session(client):
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
    assert client.live.snapshot()["sessions"] == []


@pytest.mark.parametrize("body, status, text", [
    (b'{"messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"messages": []}', 422, "messages"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 422, "messages.0.role"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}', 404, "use 'lull'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 600}', 400, "exceeds the context limit"),
])
def test_bad_bodies_get_openai_errors(client, body, status, text):
    reply = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status and text in reply.json()["error"]["message"]


def test_auth_unknown_sessions_and_long_prompts(client):
    assert client.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/health", headers={"authorization": ""}).status_code == 200
    missing = client.post("/v1/sessions/ghost/tool_call_finished")
    assert missing.status_code == 404 and "unknown session 'ghost'" in missing.json()["error"]["message"]
    assert client.delete("/v1/sessions/ghost").status_code == 404
    too_long = client.post("/v1/chat/completions", json=chat_body("word " * 1000))
    assert too_long.status_code == 400 and "at most 511 prompt tokens" in too_long.json()["error"]["message"]
    opened = client.post("/v1/sessions").json()["id"]
    assert client.get(f"/v1/sessions/{opened}").json()["state"]["phase"] == "opened"


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_is_traced_from_the_callers_traceparent_to_the_engine(client, monkeypatch, stream):
    """Spans go to an in-memory exporter instead of OTLP; the engine stub records the headers it was sent."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from proto.telemetry import tracing

    exporter = InMemorySpanExporter()
    provider = tracing.build_provider("lull-gateway", {}, exporter=exporter)
    monkeypatch.setattr(tracing, "tracer", lambda provider_=None: provider.get_tracer("lull"))
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    reply = client.post("/v1/chat/completions", json=chat_body(stream=stream),
                        headers={"x-session-id": "traced", "traceparent": f"00-{caller_trace}-{caller_span}-01"})
    assert reply.status_code == 200, reply.text
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {tracing.SPAN_GATEWAY, tracing.SPAN_GATE_WAIT, tracing.SPAN_ENGINE} <= set(spans)
    assert all(format(span.context.trace_id, "032x") == caller_trace for span in spans.values())
    assert format(spans[tracing.SPAN_GATEWAY].parent.span_id, "016x") == caller_span
    assert spans[tracing.SPAN_GATE_WAIT].attributes[tracing.ATTR_REPLICA] == "r1"
    engine_span = format(spans[tracing.SPAN_ENGINE].context.span_id, "016x")
    assert client.engines.trace_headers["traceparent"] == f"00-{caller_trace}-{engine_span}-01"
    provider.shutdown()
