"""The REST gateway end to end on a local Ray cluster: the Serve app of `controller.assembly:build_app`
(gateway ingress, two vLLM-on-CPU engine replicas routed by `LullRouter`, the
controller actor, a node agent) with a real Redis, and the official `openai`
client, unchanged."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.integration.gateway_client import RawHttp, chat, check_grpc_bad_inputs, check_rest_bad_inputs, snapshot
from tests.integration.live_platform import serve_platform

PORT = 8766
GRPC_PORT = 9766
KEY, OTHER_KEY = "sk-acme-test", "sk-beta-test"
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def platform():
    env = {"LULL_API_KEYS": f"acme:{KEY},beta:{OTHER_KEY}", "LULL_ENGINE__MAX_MODEL_LEN": str(MAX_MODEL_LEN),
           "LULL_GATEWAY__GATE_TIMEOUT_S": "20"}
    args = {"replicas": {"initial": 2}, "gateway": {"default_max_tokens": 8, "grpc_port": GRPC_PORT}}
    with serve_platform(env, args, port=PORT):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=KEY, max_retries=0, timeout=120)


raw = RawHttp(PORT, KEY)


def test_session_calls_with_a_tool_gap_reuse_the_kv(platform):
    messages = [{"role": "user", "content": "Read the file and list the functions it defines. " * 8}]
    first = platform.chat.completions.create(model="lull", messages=messages, max_tokens=8,
                                             extra_headers={"x-session-id": "agent-1"})
    assert first.choices[0].message.content and first.usage.completion_tokens == 8
    session = next(s for s in snapshot()["sessions"] if s["session_id"] == "acme/agent-1")
    # The books hold the KV as the engine allocates it, in whole blocks (engine.block_size, 32).
    assert session["tier"] == "gpu" and session["kv_tokens"] == -(-first.usage.total_tokens // 32) * 32
    status, _, body = raw("POST", "/v1/sessions/agent-1/tool_call_started")
    assert status == 200, body
    time.sleep(0.3)  # the tool call itself
    assert raw("POST", "/v1/sessions/agent-1/tool_call_finished")[0] == 200
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Now the tests."}]
    second = platform.chat.completions.create(model="lull", messages=messages, max_tokens=8,
                                              extra_headers={"x-session-id": "agent-1"})
    assert second.usage.prompt_tokens_details.cached_tokens >= 64  # the first call's prompt, in whole blocks
    assert raw("GET", "/v1/sessions/agent-1")[2]["state"]["replica"] == session["replica"]  # sticky
    assert raw("DELETE", "/v1/sessions/agent-1")[0] == 200
    assert raw("GET", "/v1/sessions/agent-1")[0] == 404


def test_streaming_matches_the_non_streamed_output(platform):
    done = chat(platform, "stream-a", "def main(): pass", temperature=0)  # greedy: OpenAI's default samples
    pieces = list(chat(platform, "stream-b", "def main(): pass", stream=True, temperature=0,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == done.choices[0].message.content
    assert pieces[-1].usage.completion_tokens == 8
    completion = platform.completions.create(model="lull", prompt="import os", max_tokens=4, stream=True)
    assert len("".join(c.choices[0].text for c in completion)) > 0


def test_two_concurrent_sessions_and_a_one_off(platform):
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(chat, platform, f"conc-{i}", f"session {i} asks") for i in range(2)]
        oneoff = pool.submit(platform.chat.completions.create, model="lull", max_tokens=4,
                             messages=[{"role": "user", "content": "no session"}])
        results = [f.result() for f in futures]
    assert all(r.usage.completion_tokens == 8 for r in results) and oneoff.result().usage.completion_tokens == 4
    ids = {s["session_id"] for s in snapshot()["sessions"]}
    assert {"acme/conc-0", "acme/conc-1"} <= ids and not any("oneoff" in i for i in ids)
    replicas = {s["replica"] for s in snapshot()["tiers"] if s["tier"] == "gpu"}
    assert len(replicas) == 2  # both engine replicas registered with the controller


def test_bad_inputs_get_clear_errors_and_the_platform_keeps_serving(platform):
    check_rest_bad_inputs(platform, raw, MAX_MODEL_LEN)
    # Another tenant's session of the same name is another session.
    status, _, _ = raw("GET", "/v1/sessions/stream-a", key=OTHER_KEY)
    assert status == 404
    assert chat(platform, "after-errors", "still serving?").usage.completion_tokens == 8
    assert raw("GET", "/health", key=None)[0] == 200


def test_grpc_session_service_generates_and_rejects_bad_input(platform):
    """The public gRPC SessionService from proto/, over the same gateway core as REST."""
    import grpc

    from proto import session_pb2 as spb
    from proto import session_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}")
    stub = session_pb2_grpc.SessionServiceStub(channel)
    auth = (("authorization", f"Bearer {KEY}"),)
    sid = stub.OpenSession(spb.OpenSessionRequest(), metadata=auth, timeout=30).session_id
    prompt = spb.TokenIds(ids=[(i * 13) % 700 + 30 for i in range(100)])
    outputs = []
    for _ in range(2):
        chunks = list(stub.Generate(spb.GenerateRequest(session_id=sid, token_ids=prompt,
                                                        sampling=spb.SamplingParams(max_tokens=6)),
                                    metadata=auth, timeout=120))
        assert chunks[-1].usage.prompt_tokens == 100 and chunks[-1].usage.completion_tokens == 6
        outputs.append([t for c in chunks for t in c.token_ids])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6  # greedy, and the second call reused the KV
    state = stub.GetSessionState(spb.GetSessionStateRequest(session_id=sid), metadata=auth, timeout=30)
    assert state.session_id == sid and state.kv_tokens >= 100

    check_grpc_bad_inputs(GRPC_PORT, KEY, sid, MAX_MODEL_LEN)
    assert stub.CloseSession(spb.CloseSessionRequest(session_id=sid), metadata=auth, timeout=30).was_open
    channel.close()
