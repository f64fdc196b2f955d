"""The REST gateway's own rules without Ray: auth, session identity, counting, admission, forwarding.

The HTTP tests run the real FastAPI app over the real `LiveController` (no moves:
nothing here exceeds a tier) and vLLM's real render state for the tiny model (the
prompt counts are vLLM's own). Only the engine replica is a stub, which answers in
vLLM's response shape and records what it was sent, because starting vLLM takes half a
minute; vLLM's real answers are covered by tests/integration/test_agent_clients.py.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from starlette.datastructures import Headers

from controller.gateway.controller_client import ControllerClient
from controller.gateway.protocol import ANONYMOUS_TENANT, ApiError, Authenticator, inferred_session_id, session_id_from
from controller.gateway.rest import create_app
from controller.gateway.service import GatewayCore, Limits
from controller.runtime.actor import Controller
from controller.runtime.live import LiveController
from proto.config import Secrets
from proto.engine_call import CallUsage

MODEL = "lull"


def test_session_id_sources_in_order():
    body = {"session_id": "from-body", "metadata": {"user_id": "user_ab12_account__session_1234abcd-5678"}}
    assert session_id_from(Headers({"X-Session-Id": "h1", "x-claude-code-session-id": "h2"}), body) == "h1"
    assert session_id_from(Headers({"x-claude-code-session-id": "h2"}), body) == "h2"
    assert session_id_from(Headers({}), body) == "from-body"
    assert session_id_from(Headers({}), {"metadata": body["metadata"]}) == "1234abcd-5678"
    claude_code_2 = {"metadata": {"user_id": json.dumps({"device_id": "d", "account_uuid": "", "session_id": "u-1"})}}
    assert session_id_from(Headers({}), claude_code_2) == "u-1"
    assert session_id_from(Headers({"x-claude-code-agent-id": "a7"}), body) == "from-body:agent:a7"
    assert session_id_from(Headers({}), {"user": "someone"}) is None  # OpenAI's user is a person, not a session
    for bad in ("   ", "a/b", "x" * 129):
        with pytest.raises(ApiError, match="A-Z a-z 0-9"):
            session_id_from(Headers({"x-session-id": bad}), {})
    with pytest.raises(ApiError, match="session id"):
        session_id_from(Headers({}), {"session_id": 7})


def test_inferred_sessions_follow_a_conversation_and_tell_conversations_apart():
    first = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "task A"}]}
    later = {"messages": first["messages"] + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    other = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "task B"}]}
    assert inferred_session_id("chat", first) == inferred_session_id("chat", later)
    assert inferred_session_id("chat", first) != inferred_session_id("chat", other)
    assert inferred_session_id("completion", {"prompt": "abc"}) != inferred_session_id("completion", {"prompt": "abd"})


def test_auth_maps_keys_to_tenants_and_accepts_any_key_when_none_are_configured():
    auth = Authenticator(Secrets(api_keys={"acme": "k-acme", "beta": "k-beta"}))
    assert auth.tenant("Bearer k-beta") == "beta" and auth.tenant("bearer  k-acme ") == "acme"
    assert auth.tenant(None, "k-acme") == "acme"  # Anthropic's x-api-key
    for header in (None, "", "Bearer nope", "Basic k-acme", "Bearer"):
        with pytest.raises(ApiError) as refused:
            auth.tenant(header)
        assert refused.value.status == 401 and refused.value.type == "authentication_error"
        assert "k-" not in refused.value.message  # never echo a key
    open_platform = Authenticator(Secrets())
    assert open_platform.tenant(None) == open_platform.tenant("Bearer sk-anything") == ANONYMOUS_TENANT
    with pytest.raises(ApiError, match="missing API key"):
        Authenticator(Secrets(), required=True).tenant(None)


class StubEngines:
    """Answers in vLLM's shape: four output tokens, streamed when asked; records what it was sent."""

    def __init__(self):
        self.calls: list[tuple[str, dict, dict]] = []

    async def http(self, replica_id, call):
        body = json.loads(call.body)
        self.calls.append((replica_id, body, dict(call.headers)))
        prompt = len(body.get("messages") or body.get("prompt") or ())
        usage = CallUsage(1, prompt, 0, 4, prompt + 4)
        if body.get("stream"):
            yield {"status": 200, "headers": [("content-type", "text/event-stream")]}
            for token, piece in enumerate("ab"):
                choice = {"index": 0, "delta": {"content": piece}} if "messages" in body else \
                    {"index": 0, "text": piece, "token_ids": [token]}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': prompt, 'completion_tokens': 2}})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        else:
            yield {"status": 200, "headers": [("content-type", "application/json")]}
            yield json.dumps({"object": "chat.completion", "usage": {"completion_tokens": 4}}).encode()
        yield usage

    async def any_http(self, call):
        yield {"status": 200, "headers": [("content-type", "application/json")]}
        yield b'{"object": "list", "data": [{"id": "lull"}]}'
        yield CallUsage()


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
def client(counter):
    live = LiveController(NoMoves())
    live.add_replica("r1", "node-1", 4096, 4096)
    engines = StubEngines()
    controller = CountingController(Controller(live))
    core = GatewayCore(ControllerClient(controller), engines, counter,
                       Limits(max_model_len=512, max_prompt_tokens=511, default_max_tokens=4, gate_timeout_s=1))
    app = create_app(core, Authenticator(Secrets(api_keys={"acme": "k-acme"})), engines, max_body_bytes=64 << 10)
    with TestClient(app, headers={"authorization": "Bearer k-acme"}) as http:
        http.engines, http.live, http.controller = engines, live, controller
        yield http


def chat_body(text="hello", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def test_a_chat_call_is_admitted_forwarded_with_lulls_fields_and_booked(client):
    body = chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                     session_id="s1", cache_salt="mine", max_tokens=3)
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-session-id"] == "s1"
    replica, sent, _ = client.engines.calls[-1]
    assert replica == "r1" and sent["tools"] == body["tools"] and sent["max_tokens"] == 3  # forwarded untouched
    assert "session_id" not in sent and sent["cache_salt"] == "acme:mine"
    lull = sent["kv_transfer_params"]["lull"]
    assert (lull["session"], lull["tenant"], lull["tier"]) == ("acme/s1", "acme", "gpu") and lull["call"]
    session = client.get("/v1/sessions/s1").json()["state"]
    assert session["tier"] == "gpu" and session["kv_tokens"] == 1 + 4  # the engine's context, not a guess
    assert client.delete("/v1/sessions/s1").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_makes_two_controller_calls_admit_and_finished(client, stream):
    client.controller.calls.clear()
    reply = client.post("/v1/chat/completions", json=chat_body(stream=stream), headers={"x-session-id": "two"})
    assert reply.status_code == 200, reply.text
    if stream:
        assert reply.text.endswith("data: [DONE]\n\n") and reply.text.count("data: ") == 3
    assert client.controller.calls == ["admit", "call_finished"]


def test_openai_fields_that_ask_nothing_of_the_server_are_served(client):
    reply = client.post("/v1/chat/completions", json=chat_body(store=False, metadata={"run": "1"},
                                                               service_tier="auto", prompt_cache_key="k"))
    assert reply.status_code == 200, reply.text


def test_a_client_without_a_session_gets_one_inferred_from_its_conversation(client):
    first = client.post("/v1/chat/completions", json=chat_body("task A"))
    again = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "task A"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]})
    assert first.headers["x-session-id"] == again.headers["x-session-id"]
    assert first.headers["x-session-id"].startswith("auto-")


@pytest.mark.parametrize("body, status, text", [
    (b'{"messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"model": "lull", "messages": "x"}', 400, "messages"),
    (b'{"model": "lull", "messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "n"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}', 404, "gpt-4"),
    (b'{"model": "lull", "messages": [{"role": "user", "content": "x"}], "kv_transfer_params": {}}', 400,
     "kv_transfer_params is set by Lull"),
    (b'{"model": "lull", "messages": [{"role": "user", "content": "x"}], "frequency_penalti": 1}', 400,
     "unsupported field(s) frequency_penalti"),
    (b'{"model": "lull", "messages": [{"role": "user", "content": "x"}], "store": true, "audio": {}}', 400,
     "unsupported field(s) audio, store"),
])
def test_bad_bodies_get_openai_errors_before_the_gate(client, body, status, text):
    client.controller.calls.clear()
    reply = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status and text in reply.json()["error"]["message"], reply.text
    assert client.controller.calls == []


def test_prompts_over_the_window_are_refused_with_vllms_message(client):
    too_long = client.post("/v1/chat/completions", json=chat_body("word " * 1000))
    assert too_long.status_code == 400 and "maximum context length is 512" in too_long.json()["error"]["message"]


def test_anthropic_errors_on_messages_and_openai_errors_elsewhere(client):
    missing = client.post("/v1/messages", json={"model": MODEL, "messages": []}, headers={"authorization": ""})
    assert missing.status_code == 401 and missing.json()["type"] == "error"
    assert missing.json()["error"]["type"] == "authentication_error"
    unknown = client.get("/v1/embeddings")
    assert unknown.status_code == 404 and "not served here" in unknown.json()["error"]["message"]


def test_oversized_bodies_are_a_413(client):
    reply = client.post("/v1/chat/completions", json=chat_body("x" * (70 << 10)))
    assert reply.status_code == 413 and "gateway.max_body_bytes" in reply.json()["error"]["message"]


def test_ungated_endpoints_go_to_any_replica_and_sessions_404(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "lull"
    assert client.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/health", headers={"authorization": ""}).status_code == 200
    missing = client.post("/v1/sessions/ghost/tool_call_finished")
    assert missing.status_code == 404 and "unknown session 'ghost'" in missing.json()["error"]["message"]
    assert client.delete("/v1/sessions/ghost").status_code == 404
    opened = client.post("/v1/sessions").json()["id"]
    assert client.get(f"/v1/sessions/{opened}").json()["state"]["phase"] == "opened"
    assert client.delete(f"/v1/sessions/{opened}").status_code == 200


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
    assert client.engines.calls[-1][2]["traceparent"] == f"00-{caller_trace}-{engine_span}-01"
    provider.shutdown()


def test_an_anthropic_field_vllm_would_ignore_is_refused_and_claude_codes_own_are_served(client):
    """vLLM's Anthropic model drops unknown fields silently; the gateway names them. Claude Code
    2.x sends ``context_management`` with ``clear_thinking`` keeping every block (captured from
    its requests): clearing nothing honours it, so that call is served."""
    base = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    keep_all = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    served = client.post("/v1/messages", json={**base, "context_management": keep_all,
                                              "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}},
                         headers={"x-session-id": "cc"})
    assert served.status_code == 200, served.text
    for extra in ({"context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": {"turns": 1}}]}},
                  {"container": "c1"}):
        refused = client.post("/v1/messages", json={**base, **extra}, headers={"x-session-id": "cc"})
        assert refused.status_code == 400 and refused.json()["type"] == "error", refused.text
        assert next(iter(extra)) in refused.json()["error"]["message"]
